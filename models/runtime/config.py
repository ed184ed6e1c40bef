"""Decoder hyper-parameters read from a Hugging Face ``config.json``.

Only the Llama and Qwen2 families are supported: pre-norm decoder blocks with
RMSNorm, grouped-query attention with rotary position embeddings (RoPE) and a
SwiGLU MLP. Anything the runtime does not implement (other architectures,
activations, RoPE scalings, sliding-window attention) is refused here, at load
time, with a message naming the offending value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """RoPE frequencies: theta_i = rope_theta ** (-2i / head_dim), then rescaled by ``rope_type``.

    ``linear`` divides every frequency by ``factor``; ``llama3`` divides only the
    low frequencies and interpolates the medium band (Llama 3.1 long context).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class DecoderConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    attention_out_bias: bool  # bias on the output projection
    mlp_bias: bool

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> DecoderConfig:
        """Build from the dict of an HF ``config.json``; ValueError on anything unsupported."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; the guide runtime supports {SUPPORTED_MODEL_TYPES}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is implemented")
        if model_type == "qwen2":
            _reject_sliding_window(cfg)
        heads = cfg["num_attention_heads"]
        qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_config(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v biases and no o_proj bias; Llama's flag covers all four.
            attention_bias=True if qwen2 else cfg.get("attention_bias", False),
            attention_out_bias=False if qwen2 else cfg.get("attention_bias", False),
            mlp_bias=False if qwen2 else cfg.get("mlp_bias", False),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DecoderConfig:
        """Read ``<path>/config.json``."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        return cls.from_dict(json.loads(file.read_text()))


def _rope_config(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (holding rope_theta); older configs
    # have a top-level `rope_theta` and an optional `rope_scaling` dict ("type" or "rope_type").
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported RoPE scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"unsupported partial_rotary_factor {partial!r}; only full rotary embeddings")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    if rope_type == "default":
        return RopeConfig(rope_theta=theta)
    if rope_type == "linear":
        return RopeConfig(rope_type="linear", rope_theta=theta, factor=params["factor"])
    return RopeConfig(
        rope_type="llama3",
        rope_theta=theta,
        factor=params["factor"],
        low_freq_factor=params["low_freq_factor"],
        high_freq_factor=params["high_freq_factor"],
        original_max_position_embeddings=params.get(
            "original_max_position_embeddings", cfg.get("max_position_embeddings", 8192)
        ),
    )


def _reject_sliding_window(cfg: dict[str, Any]) -> None:
    # Same derivation as transformers' Qwen2Config: layers >= max_window_layers slide when enabled.
    layer_types = cfg.get("layer_types")
    if layer_types is None and cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None:
        first = cfg.get("max_window_layers", cfg["num_hidden_layers"])
        layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(cfg["num_hidden_layers"])]
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"unsupported sliding-window attention (layer_types={sorted(set(layer_types))})")
