"""Whole-sequence scoring for request-level search (best-of-N, blockwise controlled decoding).

A sequence x = prompt + completion (completion from position ``start``) is scored in one
of two ways, by the guide model's head:

- V-type value head (``reward``, ``expected``, ``bernoulli``, ``histogram`` with scoring
  "v"): the head on the final-norm hidden state of x's last token,
  r(x) = expected_value(head(h_{|x|-1})) — a sequence reward model, or a prefix scorer's V(x).
- token-reward head (``arm``, ``lm``): the sum of the completion's token rewards, as ARM
  and GenARM define a sequence's reward: r(x) = sum_{t >= start} r(x_<t, x_t), with
  r = e_y . (W h) + b . h for arm and r = log pi_r(x_t | x_<t) for lm.

Sequences of any lengths share one batched full forward (``Decoder.forward``, no KV
cache): rows are right-padded, and since attention is causal the padding after a row's
last token never changes the hidden states before it. Token-reward heads score only the
completion's tokens (``GuideHead.score_tokens``): an ARM head never forms a vocabulary-wide
row, and an ``lm`` head normalises over the vocabulary at completion positions only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from models.runtime.guide import GuideModel, load_guide_model
from models.runtime.heads import TOKEN_REWARD_HEADS, VALUE_HEAD_TYPES, expected_value

SEQUENCE_SCORING_HEADS = "V-type value heads (" + ", ".join(VALUE_HEAD_TYPES) + ") or token-reward heads (" + \
    ", ".join(TOKEN_REWARD_HEADS) + ")"
DEFAULT_MAX_BATCH = 64  # rows per forward; more sequences are scored in chunks
MAX_TOKEN_SCORES = 1 << 24  # completion tokens x vocabulary of one `lm`-head forward (64 MiB in float32)


def scores_sequences(head_type: str, scoring: str) -> bool:
    """Whether a guide model with this head can score whole sequences."""
    return (scoring == "v" and head_type in VALUE_HEAD_TYPES) or head_type in TOKEN_REWARD_HEADS


class SequenceScorer:
    """Scores whole token sequences with a guide model's head, many sequences per forward."""

    def __init__(self, model: GuideModel, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        head = model.head
        if not scores_sequences(head.type, model.scoring):
            raise ValueError(f"a sequence scorer needs {SEQUENCE_SCORING_HEADS}; this head is {head.type!r} "
                             f"with scoring {model.scoring!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model.eval(), max_batch
        self.sums_token_rewards = head.type in TOKEN_REWARD_HEADS

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             max_batch: int = DEFAULT_MAX_BATCH) -> SequenceScorer:
        """Load the guide model in ``path`` (``load_guide_model``) and check its head."""
        return cls(load_guide_model(path, dtype=dtype, device=device), max_batch=max_batch)

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> Tensor:
        """Reward of each token sequence: B sequences (lengths may differ) -> ``[B]`` float32 on CPU.

        ``starts[b]`` is where row b's completion begins (its prompt length); token-reward
        heads sum over ``[starts[b], len)``, value heads read the last token only. Without
        ``starts`` a completion is everything after the first token.

        ValueError for an empty sequence, one over the model's ``max_position_embeddings``,
        a token id outside the vocabulary, or a start outside ``[1, len]``.
        """
        rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
        begins = [1] * len(rows) if starts is None else [int(s) for s in starts]
        self._check(rows, begins)
        device = self.model.backbone.embed_tokens.weight.device
        scores = [self._score_batch([r.to(device) for r in rows[i: i + size]], begins[i: i + size])
                  for i, size in self._chunks(rows, begins)]
        return torch.cat(scores) if scores else torch.zeros(0)

    def _chunks(self, rows: list[Tensor], starts: list[int]) -> list[tuple[int, int]]:
        """(first row, row count) of each forward: at most max_batch rows, and for ``lm`` heads (which
        normalise over the vocabulary) at most MAX_TOKEN_SCORES scores (completion tokens x vocabulary)."""
        chunks, i = [], 0
        vocab = self.model.backbone.config.vocab_size
        while i < len(rows):
            size = min(self.max_batch, len(rows) - i)
            if self.model.head.type == "lm":
                totals = itertools.accumulate(len(r) - b for r, b in zip(rows[i: i + size], starts[i: i + size]))
                size = max(1, sum(1 for total in totals if total * vocab <= MAX_TOKEN_SCORES))
            chunks.append((i, size))
            i += size
        return chunks

    def _score_batch(self, rows: list[Tensor], starts: list[int]) -> Tensor:
        """One padded forward over ``rows`` (1-D ids) -> ``[b]`` float32 on CPU."""
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [b, T], right-padded with 0
        hidden = self.model.backbone(ids)  # [b, T, H]
        lengths = torch.tensor([len(r) for r in rows], device=ids.device)  # [b]
        head = self.model.head
        if not self.sums_token_rewards:
            last = hidden[torch.arange(len(rows), device=ids.device), lengths - 1]  # [b, H]
            return expected_value(head, head(last)).float().cpu()  # head: [b(, m)] -> [b]
        positions = torch.arange(ids.shape[1], device=ids.device)  # t of each column
        begin = torch.tensor(starts, device=ids.device)
        row, t = ((positions >= begin[:, None]) & (positions < lengths[:, None])).nonzero(as_tuple=True)
        # r(x_<t, x_t) from the hidden state at t - 1, for the completion's tokens only: [M]
        token_rewards = head.score_tokens(hidden[row, t - 1], ids[row, t], self.model.backbone.output_embedding)
        sums = torch.zeros(len(rows), device=ids.device).index_add_(0, row, token_rewards.float())
        return (sums * head.reward_scale).cpu()

    def _check(self, rows: list[Tensor], starts: list[int]) -> None:
        config = self.model.backbone.config
        if len(starts) != len(rows):
            raise ValueError(f"got {len(starts)} starts for {len(rows)} sequences")
        for i, (row, start) in enumerate(zip(rows, starts)):
            if len(row) == 0:
                raise ValueError(f"sequence {i} is empty: a sequence scorer needs at least one token")
            if len(row) > config.max_position_embeddings:
                raise ValueError(f"sequence {i} has {len(row)} tokens, over the model's max_position_embeddings="
                                 f"{config.max_position_embeddings}")
            if int(row.min()) < 0 or int(row.max()) >= config.vocab_size:
                raise ValueError(f"sequence {i} holds token ids outside [0, {config.vocab_size})")
            if not 1 <= start <= len(row):
                raise ValueError(f"sequence {i} has {len(row)} tokens; its completion start {start} is outside "
                                 f"[1, {len(row)}]")
