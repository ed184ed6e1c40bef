"""Off-the-shelf reward models in their own HF format, loaded with ``transformers`` (no conversion).

Three forms, by the checkpoint's ``config.json`` ``architectures``:

- ``*ForSequenceClassification`` with one label (an outcome reward model, e.g. Skywork-Reward,
  a Qwen3 RM): r(x) = score(h_i), h the final-norm hidden state, i the position ``transformers``
  pools: the rightmost token that is not ``pad_token_id`` (the last token when it has none).
- ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM, Zhang et al. 2025): ``Qwen2Model`` and a
  two-layer head ``score = Linear(d, d) -> ReLU -> Linear(d, 2)``; step k's reward is
  softmax(score(h_t))[1] at the position t of the step separator ``<extra_0>`` that ends it. The
  checkpoint ships this class as remote code (``modeling_qwen2_rm.py``), which is never run here;
  ``Qwen2ForProcessRewardModel`` below is its forward, with the same parameter names (``model.*``,
  ``score.0.*``, ``score.2.*``), as vLLM's ``model_executor/models/qwen2_rm.py`` also reimplements it.
  The model card's ``make_step_rewards`` reads softmax(logits)[..., 1] at the separator positions.
- ``*ForCausalLM`` read at a step tag (Math-Shepherd, Wang et al. 2024): step k's reward is
  softmax over the logits of the two label tokens (good, bad) at the tag position t, the good
  one's probability: exp(l_good) / (exp(l_good) + exp(l_bad)), l = lm_head(h_t). Only the two label
  rows of the LM head are applied, at the tag positions only (never a vocabulary-wide row per token).

Sequences of any lengths share one forward: rows are right-padded with an attention mask; attention
is causal, so the padding after a row's last token never changes the hidden states before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel,
                          Qwen2Config, Qwen2Model)
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

QWEN_PRM_ARCHITECTURE = "Qwen2ForProcessRewardModel"


class Qwen2ForProcessRewardModel(Qwen2PreTrainedModel):
    """Qwen2.5-Math-PRM: Qwen2Model + ``score`` MLP (d -> d, ReLU, d -> 2), logits at every position."""

    config_class = Qwen2Config

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, 2))
        self.post_init()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids, attention_mask: [B, T] -> logits [B, T, 2]."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.score(hidden)


def load_reward_model(path: str | Path, architecture: str, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> PreTrainedModel:
    """The checkpoint in `path` as `transformers` builds it (local files only, no remote code)."""
    if architecture == QWEN_PRM_ARCHITECTURE:
        model_class = Qwen2ForProcessRewardModel
    elif architecture.endswith("ForSequenceClassification"):
        model_class = AutoModelForSequenceClassification
    elif architecture.endswith("ForCausalLM"):
        model_class = AutoModelForCausalLM
    else:
        raise ValueError(f"{path}: {architecture!r} is not a reward-model architecture (*ForSequenceClassification, "
                         f"{QWEN_PRM_ARCHITECTURE}, or *ForCausalLM read at a step tag)")
    model = model_class.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    return model.to(device).eval()


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """[B, T] token ids (right-padded with `pad_id`) and their attention mask (1 on real tokens)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, :len(sequence)] = 1
    return ids.to(device), mask.to(device)


def _hidden(model: PreTrainedModel, ids: Tensor, mask: Tensor) -> Tensor:
    """Final-norm hidden states [B, T, d] of the model's backbone."""
    backbone = getattr(model, model.base_model_prefix)
    return backbone(input_ids=ids, attention_mask=mask).last_hidden_state


def pooled_position(sequence: Sequence[int], pad_token_id: int | None) -> int:
    """The position a ``*ForSequenceClassification`` forward reads on `sequence` alone: its rightmost
    token that is not `pad_token_id` (0 when all are), its last token when there is no pad id."""
    if pad_token_id is None:
        return len(sequence) - 1
    return next((i for i in range(len(sequence) - 1, -1, -1) if sequence[i] != pad_token_id), 0)


@torch.inference_mode()
def sequence_rewards(model: PreTrainedModel, sequences: Sequence[Sequence[int]]) -> Tensor:
    """A one-label sequence classifier's reward of each sequence, [B] float32, in one forward."""
    pad_token_id = model.config.pad_token_id
    ids, mask = right_pad(sequences, pad_token_id or 0, model.device)
    at = torch.tensor([pooled_position(s, pad_token_id) for s in sequences], device=model.device)
    hidden = _hidden(model, ids, mask)[torch.arange(len(sequences), device=model.device), at]  # [B, d]
    return model.score(hidden)[:, 0].float()


@torch.inference_mode()
def step_rewards(model: PreTrainedModel, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 label_ids: tuple[int, int] | None = None) -> list[list[float]]:
    """The step rewards of each sequence at its step positions (one forward): for a Qwen2 PRM
    softmax(score(h_t))[1]; for a causal LM (`label_ids` = (good, bad)) softmax(l_good, l_bad)[0]."""
    ids, mask = right_pad(sequences, 0, model.device)
    rows = torch.tensor([r for r, row in enumerate(positions) for _ in row], dtype=torch.long, device=model.device)
    cols = torch.tensor([t for row in positions for t in row], dtype=torch.long, device=model.device)
    hidden = _hidden(model, ids, mask)[rows, cols]  # [S, d], S steps in all
    if label_ids is None:
        probs = model.score(hidden).float().softmax(-1)[:, 1]
    else:
        head = model.get_output_embeddings()
        bias = head.bias[list(label_ids)] if head.bias is not None else None
        logits = nn.functional.linear(hidden, head.weight[list(label_ids)], bias)  # [S, 2]: good, bad
        probs = logits.float().softmax(-1)[:, 0]
    flat, out, at = probs.tolist(), [], 0
    for row in positions:
        out.append(flat[at:at + len(row)])
        at += len(row)
    return out
