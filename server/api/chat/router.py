"""Route of POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.chat.protocol import ChatCompletionRequest
from server.api.chat.serving import ChatServing
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    return await ChatServing(services).serve(request, body)
