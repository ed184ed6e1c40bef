"""Load a ``Decoder`` from a Hugging Face checkpoint directory.

The directory holds ``config.json`` and either ``model.safetensors`` or a sharded
``model.safetensors.index.json``. Weight names are HF's (``model.embed_tokens.weight``,
``model.layers.N.self_attn.q_proj.weight``, ..., ``lm_head.weight``); the decoder's
module names mirror them, so the mapping is: drop the ``model.`` prefix (bare names
from a headless ``LlamaModel``/``Qwen2Model`` are accepted too), drop ``lm_head.weight``
when embeddings are tied, ignore stale ``rotary_emb.inv_freq`` buffers. Anything
missing, unexpected or of the wrong shape is a ``CheckpointError`` naming the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from models.runtime.config import DecoderConfig
from models.runtime.decoder import Decoder

_LIST_AT_MOST = 8  # names listed in an error message


class CheckpointError(ValueError):
    """A checkpoint's files or weights do not match its config."""


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or the shards of the index."""
    root = Path(path)
    single, index = root / "model.safetensors", root / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (root / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are absent: {missing[:_LIST_AT_MOST]}")
        return [root / s for s in shards]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {root}")


def _hf_to_decoder_name(name: str) -> str | None:
    """HF weight name -> decoder state-dict name; None for entries to ignore."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    return name.removeprefix("model.")


def _describe(kind: str, names: set[str]) -> str:
    shown = sorted(names)[:_LIST_AT_MOST]
    more = f" (+{len(names) - len(shown)} more)" if len(names) > len(shown) else ""
    return f"{kind} weights: {shown}{more}"


def load_decoder(
    path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> Decoder:
    """Build the decoder described by ``<path>/config.json`` and load its safetensors weights.

    Weights are cast to ``dtype`` and placed on ``device``; RoPE frequencies stay float32.
    """
    config = DecoderConfig.from_pretrained(path)
    state: dict[str, Tensor] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                name = _hf_to_decoder_name(hf_name)
                if name is not None:
                    state[name] = f.get_tensor(hf_name)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # a duplicate of embed_tokens.weight

    # Build on the meta device (no random init), then adopt the checkpoint tensors.
    with torch.device("meta"):
        model = Decoder(config, lm_head="lm_head.weight" in state)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
    problems = []
    if missing := expected.keys() - state.keys():
        problems.append(_describe("missing", missing))
    if unexpected := state.keys() - expected.keys():
        problems.append(_describe("unexpected", unexpected))
    common = expected.keys() & state.keys()
    wrong = {f"{k} {tuple(state[k].shape)} != {tuple(expected[k])}" for k in common if state[k].shape != expected[k]}
    if wrong:
        problems.append(_describe("wrongly shaped", wrong))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match its config.json: " + "; ".join(problems))

    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state.items()}, strict=False, assign=True)
    if model.lm_head is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # assign=True replaced the shared parameter
    return model.to(device).eval()
