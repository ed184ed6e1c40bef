"""GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.services import Services, get_services

router = APIRouter()


def _card(services: Services) -> dict:
    return {
        "id": services.settings.model_name,
        "object": "model",
        "created": services.created,
        "owned_by": "alignserve",
        "max_model_len": services.engine.max_model_len,
    }


@router.get("/v1/models")
async def list_models(services: Services = Depends(get_services)) -> dict:
    return {"object": "list", "data": [_card(services)]}


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, services: Services = Depends(get_services)) -> dict:
    services.check_model(model)
    return _card(services)
