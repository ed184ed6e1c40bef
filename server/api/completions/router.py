"""Route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.completions.protocol import CompletionRequest
from server.api.completions.serving import CompletionServing
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    return await CompletionServing(services).serve(request, body)
