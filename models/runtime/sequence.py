"""Whole-sequence scoring for request-level search (best-of-N, blockwise controlled decoding).

A sequence x = prompt + completion is scored by a V-type value head on the final-norm
hidden state of its last token: r(x) = expected_value(head(h_{|x|-1})). Sequences of any
lengths share one batched full forward (``Decoder.forward``, no KV cache): rows are
right-padded, and since attention is causal the padding after a row's last token never
changes that token's hidden state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from models.runtime.guide import GuideModel, load_guide_model
from models.runtime.heads import VALUE_HEAD_TYPES, expected_value

DEFAULT_MAX_BATCH = 64  # rows per forward; more sequences are scored in chunks


class SequenceScorer:
    """Scores whole token sequences (prompt + completion) with a V-type scalar head on the hidden state of each
    sequence's last token."""

    def __init__(self, model: GuideModel, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        head = model.head
        if model.scoring != "v" or head.type not in VALUE_HEAD_TYPES:
            raise ValueError(
                f"a sequence scorer needs a V-type value head (type one of {VALUE_HEAD_TYPES}, scoring 'v'); "
                f"this guide model's head is {head.type!r} with scoring {model.scoring!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.max_batch = model.eval(), max_batch

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
             max_batch: int = DEFAULT_MAX_BATCH) -> SequenceScorer:
        """Load the guide model in ``path`` (``load_guide_model``) and check its head."""
        return cls(load_guide_model(path, dtype=dtype, device=device), max_batch=max_batch)

    @torch.inference_mode()
    def score(self, sequences: Sequence[Sequence[int]]) -> Tensor:
        """Expected reward of each token sequence: B sequences (lengths may differ) -> ``[B]`` float32 on CPU.

        ValueError for an empty sequence, one over the model's ``max_position_embeddings``,
        or a token id outside the vocabulary.
        """
        rows = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sequences]
        self._check(rows)
        device = self.model.backbone.embed_tokens.weight.device
        scores = [self._score_batch([r.to(device) for r in rows[i: i + self.max_batch]])
                  for i in range(0, len(rows), self.max_batch)]
        return torch.cat(scores) if scores else torch.zeros(0)

    def _score_batch(self, rows: list[Tensor]) -> Tensor:
        """One padded forward over ``rows`` (1-D ids) -> ``[b]`` float32 on CPU."""
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [b, T], right-padded with 0
        last = torch.tensor([len(r) - 1 for r in rows], device=ids.device)  # [b] each row's last real token
        hidden = self.model.backbone(ids)[torch.arange(len(rows), device=ids.device), last]  # [b, H]
        return expected_value(self.model.head, self.model.head(hidden)).float().cpu()  # head: [b(, m)] -> [b]

    def _check(self, rows: list[Tensor]) -> None:
        config = self.model.backbone.config
        for i, row in enumerate(rows):
            if len(row) == 0:
                raise ValueError(f"sequence {i} is empty: a sequence scorer needs at least one token")
            if len(row) > config.max_position_embeddings:
                raise ValueError(f"sequence {i} has {len(row)} tokens, over the model's max_position_embeddings="
                                 f"{config.max_position_embeddings}")
            if int(row.min()) < 0 or int(row.max()) >= config.vocab_size:
                raise ValueError(f"sequence {i} holds token ids outside [0, {config.vocab_size})")
