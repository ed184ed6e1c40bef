"""The compute bound of guided decoding: the best guided / unguided throughput a guide allows.

Per generated token the base model runs its decoder layers and its output projection over one
token. Per steered token a guide model runs its layers over the token the base just produced
and, for V-type scoring, over each of the k candidates appended at the next position (k + 1
tokens through its layers, k head evaluations); Q-type scoring runs its layers over that one
token and its head once, over the whole vocabulary, or, when the module reads only the k
candidates' scores (every module but GenARM, whose scores are a softmax over the vocabulary),
the head's rows of those k tokens: head MACs x k / V. Counting multiply-accumulates of the weight
matrices only (attention over the context, norms and sampling are left out, as they are small
at these lengths) and assuming the base and the guide run at the same MACs per second, the
throughput ratio cannot exceed

    bound = base MACs per token / (base MACs per token + guide MACs per step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from models.runtime.heads import HEAD_WEIGHTS_FILE, read_head_config


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def layer_macs(config: dict) -> int:
    """Weight MACs of one token through all decoder layers (Llama/Qwen2: attention and gated MLP)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads", heads)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
    mlp = 3 * hidden * config["intermediate_size"]
    return config["num_hidden_layers"] * (attention + mlp)


def base_macs_per_token(model_dir: Path) -> int:
    config = _config(model_dir)
    return layer_macs(config) + config["hidden_size"] * config["vocab_size"]


def head_macs(guide_dir: Path) -> int:
    """Weight MACs of one head evaluation: its own weights, plus the output embedding for heads that
    score through it (ARM, GenARM: `e_y . W h` over the vocabulary)."""
    config = _config(guide_dir)
    head = read_head_config(guide_dir)
    own = 0  # a plain causal-LM checkpoint has no head weights of its own
    if (guide_dir / HEAD_WEIGHTS_FILE).is_file():
        with safe_open(str(guide_dir / HEAD_WEIGHTS_FILE), "pt") as weights:
            own = sum(_numel(weights.get_slice(name).get_shape()) for name in weights.keys())
    through_embedding = config["hidden_size"] * config["vocab_size"] if head["type"] in ("arm", "lm") else 0
    return own + through_embedding


def _numel(shape: list[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


@dataclass(frozen=True)
class ComputeBound:
    base_macs: int
    guide_macs: int
    scoring: str
    candidates: int  # scored per step (0: the whole vocabulary)

    @property
    def ratio(self) -> float:
        return self.base_macs / (self.base_macs + self.guide_macs)

    def describe(self) -> dict:
        return {"base_macs_per_token": self.base_macs, "guide_macs_per_step": self.guide_macs,
                "scoring": self.scoring, "candidates": self.candidates, "bound": round(self.ratio, 3)}


def compute_bound(base_dir: Path, guide_dir: Path, scoring: str, candidates: int) -> ComputeBound:
    """The bound for one guide scoring `candidates` (k; 0: the whole vocabulary, Q-type only) per step;
    `scoring` "v" or "q"."""
    layers, head = layer_macs(_config(guide_dir)), head_macs(guide_dir)
    if scoring == "v":
        guide = (candidates + 1) * layers + candidates * head
    else:
        guide = layers + (head if candidates == 0 else head * candidates // _config(guide_dir)["vocab_size"])
    return ComputeBound(base_macs_per_token(base_dir), guide, scoring, candidates)
