"""The guide models' KV-cache budget: how many blocks each guide model gets, and how many a
request may use.

Each guide model keeps its own paged KV cache (``models.runtime.kv_cache``) in the engine's
worker. Without a budget it holds every engine sequence at ``max_model_len`` (the worst
case, never exhausted). With ``--guide-kv-cache-space-gib B`` each guide model gets
``B GiB // bytes per block`` blocks of ``GUIDE_KV_BLOCK_SIZE`` tokens (never more than that worst
case: a larger budget would only leave memory unused), and the server admits a
guided request only while the blocks its engine requests could fill are free: an engine
request holds at most ``ceil((prompt + max_tokens) / GUIDE_KV_BLOCK_SIZE)`` blocks of each
guide model its guidance uses, so the worker never runs out mid-generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guidance.catalog import GuideCatalog
from guidance.loading import step_model_names
from models.runtime.config import DecoderConfig
from models.runtime.kv_cache import PagedKVCache

GUIDE_KV_BLOCK_SIZE = 16  # tokens per block
GIB = 1 << 30


def block_bytes(config: DecoderConfig, dtype: torch.dtype) -> int:
    """Bytes of one KV block of a guide model of `config` at `dtype`, over all its layers."""
    return PagedKVCache.bytes_per_block(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                        GUIDE_KV_BLOCK_SIZE, dtype)


def blocks_for(tokens: int) -> int:
    """Blocks one sequence of `tokens` tokens holds: ceil(tokens / GUIDE_KV_BLOCK_SIZE)."""
    return -(-tokens // GUIDE_KV_BLOCK_SIZE)


@dataclass(frozen=True)
class GuideKVPlan:
    """What one guide model's KV cache takes: the blocks the budget buys (None: unbudgeted), capped at
    the worst case of every engine sequence at max_model_len."""

    name: str
    block_bytes: int
    budget_blocks: int | None
    worst_case_blocks: int

    @property
    def budgeted(self) -> bool:
        """True when the budget, not the worst case, bounds the cache (admission is then checked)."""
        return self.budget_blocks is not None and self.budget_blocks < self.worst_case_blocks

    @property
    def blocks(self) -> int:
        return self.budget_blocks if self.budgeted else self.worst_case_blocks

    def describe(self) -> str:
        held = f"{self.blocks} blocks of {GUIDE_KV_BLOCK_SIZE} tokens, {self.blocks * self.block_bytes / GIB:.2f} GiB"
        if self.budgeted:
            return (f"guide model {self.name}: KV cache {held} (--guide-kv-cache-space-gib); every sequence at "
                    f"max_model_len would take {self.worst_case_blocks * self.block_bytes / GIB:.2f} GiB")
        limit = "no budget" if self.budget_blocks is None else "within --guide-kv-cache-space-gib"
        return f"guide model {self.name}: KV cache {held} ({limit}: every sequence at max_model_len)"


def guide_kv_plan(name: str, config: DecoderConfig, dtype: torch.dtype, budget_gib: float | None,
                  max_num_seqs: int, max_model_len: int) -> GuideKVPlan:
    """The KV cache the worker allocates for guide model `name`, from the settings alone."""
    size = block_bytes(config, dtype)
    budget = None if budget_gib is None else int(budget_gib * GIB) // size
    return GuideKVPlan(name, size, budget, max_num_seqs * blocks_for(max_model_len))


def guide_kv_plans(catalog: GuideCatalog, dtype: torch.dtype, budget_gib: float | None, max_num_seqs: int,
                   max_model_len: int) -> list[GuideKVPlan]:
    """The plan of every per-step guide model of `catalog` (those the worker loads; printed at start-up)."""
    return [guide_kv_plan(name, DecoderConfig.from_pretrained(catalog[name].path), dtype, budget_gib, max_num_seqs,
                          max_model_len) for name in step_model_names(catalog)]


def guide_kv_capacity(plans: Sequence[GuideKVPlan]) -> dict[str, int]:
    """Blocks of each guide model whose cache the budget bounds; the server admits requests against it
    and the worker sizes its caches by it (a model not listed holds the worst case)."""
    return {plan.name: plan.blocks for plan in plans if plan.budgeted}


def request_blocks(models: Sequence[str], sequences: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Blocks of each guide model in `models` that engine requests of (count, tokens) may fill."""
    blocks = sum(count * blocks_for(tokens) for count, tokens in sequences)
    return {name: blocks for name in models} if blocks else {}
