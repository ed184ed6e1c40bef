"""Route of POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api.chat.protocol import ChatCompletionRequest
from server.api.chat.serving import ChatServing
from server.api.streaming import SSE_HEADERS, cancel_on_disconnect
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    serving = ChatServing(services)
    prompt_ids, options, guidance = serving.prepare(body)
    if body.stream:
        return StreamingResponse(
            serving.stream(body, prompt_ids, options, guidance), media_type="text/event-stream", headers=SSE_HEADERS
        )
    result = await cancel_on_disconnect(request, serving.complete(body, prompt_ids, options, guidance))
    return JSONResponse(result) if result is not None else Response(status_code=499)
