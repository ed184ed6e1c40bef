"""The guide models' KV-cache budget: how many blocks each guide model gets, and how many a
request may use.

Each guide model keeps its own paged KV cache (``models.runtime.kv_cache``) in the engine's
worker. Without a budget it holds every engine sequence at ``max_model_len`` (the worst
case, never exhausted). With ``--guide-kv-cache-space-gib B`` each guide model gets
``B GiB // bytes per block`` blocks of ``GUIDE_KV_BLOCK_SIZE`` tokens, and the server admits a
guided request only while the blocks its engine requests could fill are free: an engine
request holds at most ``ceil((prompt + max_tokens) / GUIDE_KV_BLOCK_SIZE)`` blocks of each
guide model its guidance uses, so the worker never runs out mid-generation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guidance.catalog import GuideCatalog, GuideModelInfo
from guidance.loading import step_model_names
from models.runtime.config import DecoderConfig
from models.runtime.kv_cache import PagedKVCache

GUIDE_KV_BLOCK_SIZE = 16  # tokens per block
GIB = 1 << 30


def guide_kv_blocks(info: GuideModelInfo, budget_gib: float, dtype: torch.dtype) -> int:
    """Blocks of `info`'s KV cache that fit in `budget_gib` GiB at `dtype`."""
    config = DecoderConfig.from_pretrained(info.path)
    return PagedKVCache.blocks_in_budget(int(budget_gib * GIB), config.num_hidden_layers,
                                         config.num_key_value_heads, config.head_dim, GUIDE_KV_BLOCK_SIZE, dtype)


def guide_kv_capacity(catalog: GuideCatalog, budget_gib: float | None, dtype: torch.dtype) -> dict[str, int]:
    """Blocks of each per-step guide model (those the worker loads) under the budget; {} without one.
    The server admits requests against it and the worker sizes its caches by it."""
    if budget_gib is None:
        return {}
    return {name: guide_kv_blocks(catalog[name], budget_gib, dtype) for name in step_model_names(catalog)}


def blocks_for(tokens: int) -> int:
    """Blocks one sequence of `tokens` tokens holds: ceil(tokens / GUIDE_KV_BLOCK_SIZE)."""
    return -(-tokens // GUIDE_KV_BLOCK_SIZE)


def request_blocks(models: Sequence[str], sequences: Sequence[tuple[int, int]]) -> dict[str, int]:
    """Blocks of each guide model in `models` that engine requests of (count, tokens) may fill."""
    blocks = sum(count * blocks_for(tokens) for count, tokens in sequences)
    return {name: blocks for name in models} if blocks else {}
