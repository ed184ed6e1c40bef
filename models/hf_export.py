"""What the exports of a guide model to a public Hugging Face class share (``export_classifier``,
``export_prm``): reading its head and backbone, and writing a Llama backbone as a Qwen2 one.

A Qwen2 attention layer has q/k/v biases where Llama has none: written as zeros, the Qwen2
backbone computes exactly what the Llama one does (same RMSNorm, rotary embedding, SwiGLU MLP).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, PretrainedConfig, Qwen2Config

from models.runtime.heads import HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE
from models.runtime.loader import safetensors_files

FAMILIES = ("llama", "qwen2")  # backbones the exports write


def read_head(guide_dir: Path, kind: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The guide's head config and weights; ValueError unless it is a `kind` head scoring "v"."""
    head = json.loads((guide_dir / HEAD_CONFIG_FILE).read_text())
    if head["type"] != kind or head.get("scoring", "q") != "v":
        raise ValueError(f"{guide_dir}: {what} needs a {kind!r} head with scoring 'v', got {head['type']!r} with "
                         f"scoring {head.get('scoring', 'q')!r}")
    return head, load_file(guide_dir / HEAD_WEIGHTS_FILE)


def read_backbone_config(guide_dir: Path, what: str) -> PretrainedConfig:
    """The guide backbone's config; ValueError unless it is a bias-free Llama or a Qwen2."""
    source = AutoConfig.from_pretrained(str(guide_dir), local_files_only=True)
    if source.model_type not in FAMILIES or getattr(source, "mlp_bias", False) \
            or getattr(source, "attention_bias", False):
        raise ValueError(f"{guide_dir}: {what} needs a Llama backbone without biases (or a Qwen2 one), got "
                         f"{source.model_type!r}")
    return source


def backbone_weights(guide_dir: Path) -> dict[str, torch.Tensor]:
    """The decoder's tensors (``model.*``); the language-model head is left out."""
    return {name: tensor for file in safetensors_files(guide_dir) for name, tensor in load_file(file).items()
            if name.startswith("model.")}


def as_qwen2(weights: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """`weights` with zero q/k/v biases where they have none (a Llama backbone read as Qwen2)."""
    weights = dict(weights)
    for layer in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            weight = weights[f"{prefix}.weight"]
            weights.setdefault(f"{prefix}.bias", torch.zeros(len(weight), dtype=weight.dtype))
    return weights


def qwen2_config(source: PretrainedConfig, architecture: str, vocab_size: int, **extra: object) -> Qwen2Config:
    """A Qwen2 config of `source`'s shape (a Llama or Qwen2 backbone) for `architecture`."""
    return Qwen2Config(
        architectures=[architecture], vocab_size=vocab_size, hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads, num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act, max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps, rope_parameters=source.rope_parameters, use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id, dtype=source.dtype, **extra)
