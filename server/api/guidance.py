"""GET /v1/guidance: the guidance modules installed, the guide models configured, the search
strategies and scorers, and parameter ranges."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from guidance.registry import available_modules
from guidance.search.spec import SEARCH_TYPES
from server.services import Services, get_services

router = APIRouter()


@router.get("/v1/guidance")
async def list_guidance(services: Services = Depends(get_services)) -> dict:
    modules = [
        {
            "type": module.name,
            "description": module.description,
            "guide_heads": list(module.head_types),
            "default_top_k": module.default_top_k,
            "parameters": module.params_class.model_json_schema()["properties"],
        }
        for module in available_modules().values()
    ]
    models = [services.catalog[name].describe() for name in services.catalog.names()]
    settings = services.settings
    search = {
        "types": [
            {"type": name, "description": (params.__doc__ or "").strip(),
             "parameters": params.model_json_schema()["properties"]}
            for name, params in SEARCH_TYPES.items()
        ],
        "scorers": [services.scorers[name].describe() for name in services.scorers.names()],
        "max_candidates": settings.max_search_candidates,
        "max_block_tokens": settings.max_block_tokens,
    }
    return {"object": "list", "modules": modules, "guide_models": models,
            "max_entries": settings.max_guidance_entries, "search": search}
