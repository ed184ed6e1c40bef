"""GET /v1/guidance: the guidance modules installed, the guide models configured, and parameter ranges."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from guidance.registry import available_modules
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
    return {"object": "list", "modules": modules, "guide_models": models,
            "max_entries": services.settings.max_guidance_entries}
