"""A guide model: decoder backbone + guide head, loaded from one directory.

Per generated token the caller does one batched incremental forward:

    Q-type:  h = step(slots, last_tokens); scores = score_next(h)              [B, V(, m)]
    V-type:  step(slots, last_tokens); scores = score_candidates(slots, cand)  [B, k(, m)]

When a request joins, ``prefill`` its prompt into a fresh slot (``cache.allocate()``);
when it leaves, ``cache.free(slot)``. The cache is paged: ``cache.can_grow(slots, new_tokens)``
says beforehand whether a prefill or step fits in the free blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from models.runtime.decoder import Decoder
from models.runtime.heads import GuideHead, load_head
from models.runtime.kv_cache import PagedKVCache
from models.runtime.loader import load_decoder


class GuideModel(nn.Module):
    def __init__(self, backbone: Decoder, head: GuideHead) -> None:
        super().__init__()
        if (head.hidden_size, head.vocab_size) != (backbone.config.hidden_size, backbone.config.vocab_size):
            raise ValueError(
                f"head is for hidden={head.hidden_size}, vocab={head.vocab_size}; backbone has "
                f"hidden={backbone.config.hidden_size}, vocab={backbone.config.vocab_size}"
            )
        if head.uses_output_embedding and backbone.lm_head is None:
            raise ValueError(f"a {head.type!r} head scores tokens through the LM head, which this backbone lacks")
        self.backbone, self.head = backbone, head

    @property
    def scoring(self) -> str:
        """Either "q" (score every next token from the prefix) or "v" (score k appended candidates)."""
        return self.head.scoring

    @property
    def cache(self) -> PagedKVCache:
        return self.backbone.require_cache()

    def setup_cache(
        self, num_slots: int, max_len: int, num_blocks: int | None = None, block_size: int = 16
    ) -> PagedKVCache:
        """Paged cache for the backbone (see ``Decoder.setup_cache``; ``blocks_in_budget`` sizes ``num_blocks``)."""
        return self.backbone.setup_cache(num_slots, max_len, num_blocks, block_size)

    def blocks_in_budget(self, budget_bytes: int, block_size: int = 16) -> int:
        """Backbone cache blocks that fit in ``budget_bytes``."""
        return self.backbone.blocks_in_budget(budget_bytes, block_size)

    def prefill(self, slots: Sequence[int], token_ids: Sequence[Tensor]) -> Tensor:
        """Append prompts to slots; hidden of each row's last token ``[B, H]``."""
        return self.backbone.prefill(slots, token_ids)

    def step(self, slots: Sequence[int] | Tensor, token_ids: Tensor) -> Tensor:
        """Append one token per row (``[B]``, ``[B]``; slots best as host ints); hidden ``[B, H]``."""
        return self.backbone.step(slots, token_ids)

    @torch.no_grad()
    def score_next(self, hidden: Tensor) -> Tensor:
        """Q-type: prefix hidden ``[B, H]`` -> score of every next token ``[B, V]`` (``[B, V, m]`` for histograms)."""
        if self.scoring != "q":
            raise RuntimeError(f"{self.head.type!r} head is V-type: use score_candidates")
        return self.head(hidden, self._output_embedding())

    @torch.no_grad()
    def score_next_tokens(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """Q-type, the given next tokens only: prefix hidden ``[B, H]``, tokens ``[B, k]`` -> ``[B, k]``
        (``[B, k, m]`` for histograms), ``score_next(hidden)`` gathered at `tokens` without computing
        the other V - k scores (for ``lm`` heads, still normalised over the vocabulary)."""
        if self.scoring != "q":
            raise RuntimeError(f"{self.head.type!r} head is V-type: use score_candidates")
        rows, k = tokens.shape
        scores = self.head.score_tokens(hidden.repeat_interleave(k, dim=0), tokens.reshape(-1), self._output_embedding())
        return scores.unflatten(0, (rows, k))

    @torch.no_grad()
    def score_candidates(self, slots: Sequence[int] | Tensor, candidates: Tensor) -> Tensor:
        """V-type: slots ``[B]`` (best host ints), candidates ``[B, k]`` -> ``[B, k]`` (``[B, k, m]`` for histograms).

        The cache is not modified."""
        if self.scoring != "v":
            raise RuntimeError(f"{self.head.type!r} head is Q-type: use score_next")
        return self.head(self.backbone.score_candidates(slots, candidates), self._output_embedding())

    def _output_embedding(self) -> Tensor | None:
        # Only the arm and lm heads read it; value heads may sit on a headless backbone.
        return self.backbone.output_embedding if self.head.uses_output_embedding else None


def load_guide_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> GuideModel:
    """Load ``<path>/config.json`` + safetensors (backbone) and ``guide_head.json`` + ``head.safetensors``."""
    backbone = load_decoder(path, dtype=dtype, device=device)
    head = load_head(path, backbone.config.hidden_size, backbone.config.vocab_size, dtype=dtype, device=device)
    return GuideModel(backbone, head)
