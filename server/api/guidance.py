"""GET /v1/guidance: the guidance modules installed, the guide models configured, the search
strategies and scorers, and parameter ranges.

Each module's and search type's ``parameters`` are its pydantic model's JSON-schema properties with
every ``$ref`` replaced by the definition it names, and ``required`` lists the fields without a
default, so a client reads nested parameters (best-of-N's ``prune``) from the listing alone.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from guidance.registry import available_modules
from guidance.search.spec import SEARCH_TYPES
from server.services import Services, get_services

router = APIRouter()

REF_PREFIX = "#/$defs/"


def inline_refs(node: Any, defs: dict[str, Any]) -> Any:
    """`node` with each ``{"$ref": "#/$defs/Name"}`` replaced by ``defs["Name"]``, recursively (the
    parameter models are not recursive, so this ends)."""
    if isinstance(node, list):
        return [inline_refs(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return inline_refs({**defs[node["$ref"].removeprefix(REF_PREFIX)], **siblings}, defs)
    return {key: inline_refs(value, defs) for key, value in node.items()}


def parameter_schema(params: type[BaseModel]) -> dict[str, Any]:
    """{"parameters": the properties of `params`' JSON schema, refs inlined, "required": its required fields}."""
    schema = params.model_json_schema()
    return {"parameters": inline_refs(schema["properties"], schema.get("$defs", {})),
            "required": schema.get("required", [])}


@router.get("/v1/guidance")
async def list_guidance(services: Services = Depends(get_services)) -> dict:
    modules = [
        {
            "type": module.name,
            "description": module.description,
            "guide_heads": list(module.head_types),
            "default_top_k": module.default_top_k,
            **parameter_schema(module.params_class),
        }
        for module in available_modules().values()
    ]
    models = [services.catalog[name].describe() for name in services.catalog.names()]
    settings = services.settings
    search = {
        "types": [
            {"type": name, "description": (params.__doc__ or "").strip(), **parameter_schema(params)}
            for name, params in SEARCH_TYPES.items()
        ],
        "scorers": [services.scorers[name].describe() for name in services.scorers.names()],
        "max_candidates": settings.max_search_candidates,
        "max_block_tokens": settings.max_block_tokens,
    }
    return {"object": "list", "modules": modules, "guide_models": models,
            "max_entries": settings.max_guidance_entries, "search": search}
