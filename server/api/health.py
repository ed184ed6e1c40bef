"""GET /health (process and engine alive) and GET /ready (models loaded, accepting work)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from server.services import Services, get_services

router = APIRouter()


@router.get("/health")
async def health(services: Services = Depends(get_services)) -> JSONResponse:
    if services.lifecycle.exit_code is not None:  # the engine died or stopped answering; the server is exiting
        return JSONResponse({"status": "unhealthy", "detail": "engine dead"}, status_code=503)
    try:
        await services.engine.check_health()
    except Exception as exc:
        return JSONResponse({"status": "unhealthy", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ok", "unfinished_requests": services.engine.num_unfinished_requests})


@router.get("/ready")
async def ready(services: Services = Depends(get_services)) -> JSONResponse:
    if not services.engine.alive or services.lifecycle.exit_code is not None:
        return JSONResponse({"status": "engine dead"}, status_code=503)
    if services.lifecycle.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready", "model": services.settings.model_name})
