"""The guide-KV plan printed at start-up: memory from the settings alone, within the budget."""

from __future__ import annotations

import torch

from bench.suite.cli import ONE_B_GUIDE
from guidance.kv_budget import GIB, guide_kv_capacity, guide_kv_plan
from models.runtime.config import DecoderConfig

ONE_B = DecoderConfig.from_dict(ONE_B_GUIDE)


def test_a_1b_guide_for_256_sequences_at_8192_fits_the_budget():
    plan = guide_kv_plan("guide-1b", ONE_B, torch.bfloat16, 4.0, max_num_seqs=256, max_model_len=8192)
    assert plan.block_bytes == 16 * 2 * 8 * 16 * 64 * 2  # layers x (K, V) x heads x tokens x dim x bytes
    assert plan.blocks * plan.block_bytes <= 4 * GIB
    assert plan.blocks == 4 * GIB // plan.block_bytes
    assert plan.worst_case_blocks * plan.block_bytes == 64 * GIB  # 256 x 8192 tokens x 32 KiB
    assert "8192 blocks of 16 tokens, 4.00 GiB" in plan.describe() and "64.00 GiB" in plan.describe()


def test_without_a_budget_the_cache_holds_every_sequence_at_max_model_len():
    plan = guide_kv_plan("guide-1b", ONE_B, torch.bfloat16, None, max_num_seqs=4, max_model_len=100)
    assert plan.blocks == 4 * 7  # ceil(100 / 16) blocks per sequence
    assert "no budget" in plan.describe()


def test_a_budget_past_the_worst_case_is_capped_and_admits_without_checks():
    plan = guide_kv_plan("guide-1b", ONE_B, torch.bfloat16, 4.0, max_num_seqs=4, max_model_len=100)
    assert not plan.budgeted and plan.blocks == 4 * 7
    assert "within --guide-kv-cache-space-gib" in plan.describe()
    budgeted = guide_kv_plan("other", ONE_B, torch.bfloat16, 1 / 1024, max_num_seqs=4, max_model_len=100)
    assert budgeted.budgeted and budgeted.blocks == 2  # 1 MiB of 512 KiB blocks
    assert guide_kv_capacity([plan, budgeted]) == {"other": 2}
