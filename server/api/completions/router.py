"""Route of POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.completions.protocol import CompletionRequest
from server.api.completions.serving import CompletionServing
from server.api.streaming import SSE_HEADERS, cancel_on_disconnect
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/completions")
async def create_completion(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    serving = CompletionServing(services)
    prompts, guidance = serving.prepare(body)
    if body.stream:
        return StreamingResponse(
            serving.stream(body, prompts, guidance), media_type="text/event-stream", headers=SSE_HEADERS
        )
    result = await cancel_on_disconnect(request, serving.complete(body, prompts, guidance))
    return JSONResponse(result) if result is not None else Response(status_code=499)
