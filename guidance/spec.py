"""A request's guidance list: parsed, checked against the modules and the catalog, resolved.

The same function runs at the HTTP edge (to answer 400s naming the field) and in
the engine's `validate_params` (so nothing reaches the batch unchecked).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guidance.catalog import GuideCatalog
from guidance.errors import GuidanceError
from guidance.module import WHOLE_VOCABULARY, GuidanceModule
from guidance.params import GuidanceParams, validate_entry
from guidance.registry import UnknownGuidanceModule, get_module


@dataclass(frozen=True)
class ResolvedGuidance:
    """One validated guidance entry with its module and candidate count (-1 = whole vocabulary)."""

    module: GuidanceModule
    params: GuidanceParams
    top_k: int

    def describe(self) -> dict[str, Any]:
        """The entry as it steers: the budget fields appear only when set."""
        budget = {name: value for name in ("max_kl", "kl_per_token")
                  if (value := getattr(self.params, name)) is not None}
        return {"type": self.module.name, "model": self.params.model, "strength": self.params.strength,
                "top_k": self.top_k, "min_entropy": self.params.min_entropy, **budget}


def parse_guidance(
    entries: Sequence[Any], catalog: GuideCatalog, *, max_entries: int | None = None,
    check_models: bool = True, param: str = "guidance",
) -> list[ResolvedGuidance]:
    """Validate every entry; raise GuidanceError naming the first bad field.

    With `check_models` False only the entries' own fields are checked (where no catalog is at hand).
    """
    if not isinstance(entries, (list, tuple)):
        raise GuidanceError("guidance must be a list of objects", param)
    if max_entries is not None and len(entries) > max_entries:
        raise GuidanceError(f"at most {max_entries} guidance entries are allowed, got {len(entries)}", param)
    return [_parse_entry(entry, catalog, check_models, f"{param}[{i}]") for i, entry in enumerate(entries)]


def _parse_entry(entry: Any, catalog: GuideCatalog, check_models: bool, param: str) -> ResolvedGuidance:
    if not isinstance(entry, dict):
        raise GuidanceError("each guidance entry must be an object", param)
    if "type" not in entry:
        raise GuidanceError(f"Missing guidance parameter: {param}.type", f"{param}.type")
    try:
        module = get_module(entry["type"]) if isinstance(entry["type"], str) else None
    except UnknownGuidanceModule as exc:
        raise GuidanceError(exc.message, f"{param}.type") from None
    if module is None:
        raise GuidanceError("guidance type must be a string", f"{param}.type")
    params = validate_entry(module.params_class, entry, param)
    top_k = module.default_top_k if params.top_k is None else params.top_k
    if not check_models:
        return ResolvedGuidance(module, params, top_k)
    if params.model not in catalog:
        known = ", ".join(catalog.names()) or "none are configured"
        raise GuidanceError(f"Unknown guide model {params.model!r}; configured: {known}", f"{param}.model")
    info = catalog[params.model]
    if info.head_type not in module.head_types:
        raise GuidanceError(
            f"Guide model {params.model!r} has a {info.head_type!r} head; {module.name!r} needs one of "
            f"{', '.join(module.head_types)}", f"{param}.model")
    if info.scoring == "v" and top_k == WHOLE_VOCABULARY:
        raise GuidanceError(
            f"Guide model {params.model!r} scores candidates one by one; set top_k to a positive number",
            f"{param}.top_k")
    return ResolvedGuidance(module, params, top_k)
