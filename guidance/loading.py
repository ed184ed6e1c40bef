"""Loading the configured guide models, and the tokenizer check that guards them."""

from __future__ import annotations

from pathlib import Path

import torch

from guidance.catalog import GuideCatalog
from guidance.registry import available_modules
from models.runtime.guide import GuideModel, load_guide_model


def step_model_names(catalog: GuideCatalog) -> list[str]:
    """Guide models some installed per-step module can use (a sequence reward model is not one)."""
    heads = {head for module in available_modules().values() for head in module.head_types}
    return [name for name in catalog.names() if catalog[name].head_type in heads]


def load_guide_models(catalog: GuideCatalog, dtype: torch.dtype, device: torch.device | str) -> dict[str, GuideModel]:
    """The per-step guide models of `catalog`, loaded (each keeps a KV-cache slot per engine sequence)."""
    return {name: load_guide_model(catalog[name].path, dtype=dtype, device=device).eval()
            for name in step_model_names(catalog)}


def check_tokenizers(base_model: Path, catalog: GuideCatalog) -> None:
    """Refuse guide models whose tokenizer differs from the base model's.

    Guidance scores the base model's token ids, so both must mean the same strings.
    """
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_model).get_vocab()
    for name in catalog.names():
        path = catalog[name].path
        try:
            guide = AutoTokenizer.from_pretrained(path).get_vocab()
        except (OSError, ValueError) as exc:
            raise ValueError(f"guide model {name!r}: no tokenizer in {path} ({exc})") from exc
        if guide != base:
            differing = len(set(base.items()) ^ set(guide.items()))
            raise ValueError(
                f"guide model {name!r} ({path}) uses a different tokenizer from the base model {base_model} "
                f"({len(guide)} vs {len(base)} tokens, {differing} entries differ); guidance needs the same "
                "tokenizer")
        if catalog[name].vocab_size < len(base):
            raise ValueError(f"guide model {name!r} has vocab_size {catalog[name].vocab_size}, smaller than the "
                             f"base tokenizer's {len(base)} tokens")
