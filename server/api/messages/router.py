"""Routes of POST /v1/messages and POST /v1/messages/count_tokens (errors in Anthropic's envelope: server.errors)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.messages.protocol import CountTokensRequest, MessagesRequest
from server.api.messages.serving import MessagesServing
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/messages")
async def create_message(body: MessagesRequest, request: Request, services: Services = Depends(get_services)
                         ) -> Response:
    return await MessagesServing(services).create(request, body)


@router.post("/v1/messages/count_tokens")
async def count_message_tokens(body: CountTokensRequest, services: Services = Depends(get_services)
                               ) -> dict[str, int | dict[str, int]]:
    return MessagesServing(services).count_tokens(body)
