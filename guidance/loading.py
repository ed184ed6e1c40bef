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


def tokenizer_difference(base_model: Path, other: Path) -> str | None:
    """How the tokenizer in ``other`` differs from the base model's (None when they are the same);
    OSError / ValueError when ``other`` holds no tokenizer."""
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(base_model).get_vocab()
    theirs = AutoTokenizer.from_pretrained(other).get_vocab()
    if theirs == base:
        return None
    differing = len(set(base.items()) ^ set(theirs.items()))
    return f"{len(theirs)} vs {len(base)} tokens, {differing} entries differ"


def check_tokenizers(base_model: Path, catalog: GuideCatalog) -> None:
    """Refuse guide models whose tokenizer differs from the base model's.

    Guidance scores the base model's token ids, so both must mean the same strings.
    """
    from transformers import AutoTokenizer

    base_size = len(AutoTokenizer.from_pretrained(base_model))
    for name in catalog.names():
        path = catalog[name].path
        try:
            difference = tokenizer_difference(base_model, path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"guide model {name!r}: no tokenizer in {path} ({exc})") from exc
        if difference is not None:
            raise ValueError(
                f"guide model {name!r} ({path}) uses a different tokenizer from the base model {base_model} "
                f"({difference}); guidance needs the same tokenizer")
        if catalog[name].vocab_size < base_size:
            raise ValueError(f"guide model {name!r} has vocab_size {catalog[name].vocab_size}, smaller than the "
                             f"base tokenizer's {base_size} tokens")
