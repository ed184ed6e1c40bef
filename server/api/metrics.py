"""GET /metrics: Prometheus text format (vLLM's metrics and alignserve's)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from server.metrics import GUIDE_STEPS
from server.services import Services, get_services

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/metrics")
async def metrics(services: Services = Depends(get_services)) -> Response:
    try:
        GUIDE_STEPS.timings = await services.engine.guidance_timings()
    except Exception as exc:  # a scrape must not fail because the worker is busy or gone
        logger.warning("guidance timings unavailable: %s", exc)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
