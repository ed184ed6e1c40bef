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
from guidance.kl_budget import KLBudget, under
from guidance.module import WHOLE_VOCABULARY, GuidanceModule, GuideTerm
from guidance.params import GuidanceParams, validate_entry
from guidance.registry import UnknownGuidanceModule, get_module


@dataclass(frozen=True)
class ResolvedGuidance:
    """One validated guidance entry with its module and candidate count (-1 = whole vocabulary)."""

    module: GuidanceModule
    params: GuidanceParams
    top_k: int

    @property
    def terms(self) -> tuple[GuideTerm, ...]:
        """The guide models the entry reads, each with the weight of its offset."""
        return self.module.terms(self.params)

    @property
    def models(self) -> tuple[str, ...]:
        """The names of the guide models the entry reads."""
        return tuple(term.model for term in self.terms)

    def describe(self) -> dict[str, Any]:
        """The entry as it steers: its guide models by field, and the budget fields only when set."""
        models = {term.field: term.model for term in self.terms}
        budget = {name: value for name in ("max_kl", "kl_per_token")
                  if (value := getattr(self.params, name)) is not None}
        return {"type": self.module.name, **models, "strength": self.params.strength,
                "top_k": self.top_k, "min_entropy": self.params.min_entropy, **budget}


def parse_guidance(
    entries: Sequence[Any], catalog: GuideCatalog, *, max_entries: int | None = None,
    check_models: bool = True, param: str = "guidance", budget: KLBudget | None = None,
) -> list[ResolvedGuidance]:
    """Validate every entry; raise GuidanceError naming the first bad field.

    With `check_models` False only the entries' own fields are checked (where no catalog is at hand).
    `budget` is the request's own KL budget (its top-level `max_kl`, `kl_per_token`): it is folded into
    every entry (`guidance.kl_budget.under`), and needs at least one entry to bound.
    """
    if not isinstance(entries, (list, tuple)):
        raise GuidanceError("guidance must be a list of objects", param)
    if budget is not None and not entries:
        name = "max_kl" if budget.max_kl is not None else "kl_per_token"
        raise GuidanceError(f"{name} bounds the KL of the request's guidance, and the request has no guidance "
                            f"entries: a KL budget means nothing on an unguided request; add guidance or leave "
                            f"{name} out", name)
    if max_entries is not None and len(entries) > max_entries:
        raise GuidanceError(f"at most {max_entries} guidance entries are allowed, got {len(entries)}", param)
    return [_parse_entry(entry, catalog, check_models, f"{param}[{i}]", budget) for i, entry in enumerate(entries)]


def _parse_entry(entry: Any, catalog: GuideCatalog, check_models: bool, param: str,
                 budget: KLBudget | None) -> ResolvedGuidance:
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
    params = validate_entry(module.params_class, entry, param, request_budget=budget is not None)
    if budget is not None:
        params = params.model_copy(update=under(params.model_dump(), budget))
    top_k = module.default_top_k if params.top_k is None else params.top_k
    resolved = ResolvedGuidance(module, params, top_k)
    if check_models:
        for term in resolved.terms:
            _check_model(term, module, top_k, catalog, param)
    return resolved


def _check_model(term: GuideTerm, module: GuidanceModule, top_k: int, catalog: GuideCatalog, param: str) -> None:
    """The guide model of one term is configured and can serve the module; GuidanceError naming its field."""
    if (kind := catalog.scorer_kind(term.model)) is not None:
        raise GuidanceError(
            f"{term.model!r} is a scorer only ({kind}), for search.scorer: token-level guidance needs a guide model "
            f"in this server's format with the base model's tokenizer", f"{param}.{term.field}")
    if term.model not in catalog:
        known = ", ".join(catalog.names()) or "none are configured"
        raise GuidanceError(f"Unknown guide model {term.model!r}; configured: {known}", f"{param}.{term.field}")
    info = catalog[term.model]
    if info.head_type not in module.head_types:
        raise GuidanceError(
            f"Guide model {term.model!r} has a {info.head_type!r} head; {module.name!r} needs one of "
            f"{', '.join(module.head_types)}", f"{param}.{term.field}")
    if info.scoring == "v" and top_k == WHOLE_VOCABULARY:
        raise GuidanceError(
            f"Guide model {term.model!r} scores candidates one by one; set top_k to a positive number",
            f"{param}.top_k")
