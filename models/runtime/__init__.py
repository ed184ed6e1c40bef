"""Guide-model runtime: a compact Llama/Qwen2 decoder with a paged, slot-indexed KV cache and guide heads.

Pure torch (no vLLM): it runs next to the base model inside the engine's worker, one
batched incremental forward per generated token over all guided rows.
"""

from models.runtime.config import DecoderConfig, RopeConfig
from models.runtime.decoder import Decoder
from models.runtime.guide import GuideModel, load_guide_model
from models.runtime.heads import (
    HEAD_TYPES,
    VALUE_HEAD_TYPES,
    ARMHead,
    BernoulliHead,
    ExpectedHead,
    GuideHead,
    HistogramHead,
    LMHead,
    RewardHead,
    build_head,
    expected_value,
    load_head,
    save_head,
)
from models.runtime.kv_cache import BlocksExhaustedError, PagedKVCache, SlotsExhaustedError
from models.runtime.loader import CheckpointError, load_decoder
from models.runtime.sequence import SequenceScorer

__all__ = [
    "HEAD_TYPES",
    "VALUE_HEAD_TYPES",
    "ARMHead",
    "BernoulliHead",
    "BlocksExhaustedError",
    "CheckpointError",
    "Decoder",
    "DecoderConfig",
    "ExpectedHead",
    "GuideHead",
    "GuideModel",
    "HistogramHead",
    "LMHead",
    "PagedKVCache",
    "RewardHead",
    "RopeConfig",
    "SequenceScorer",
    "SlotsExhaustedError",
    "build_head",
    "expected_value",
    "load_decoder",
    "load_guide_model",
    "load_head",
    "save_head",
]
