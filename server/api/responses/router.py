"""Routes of POST /v1/responses, GET /v1/responses/{response_id} and POST /v1/responses/{response_id}/cancel."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.responses import serving
from server.api.responses.protocol import ResponsesRequest
from server.api.responses.serving import ResponsesServing
from server.api.responses.store import ResponseStore, get_response_store
from server.services import Services, get_services

router = APIRouter()


@router.post("/v1/responses")
async def create_response(body: ResponsesRequest, request: Request, services: Services = Depends(get_services),
                          store: ResponseStore = Depends(get_response_store)) -> Response:
    return await ResponsesServing.start(services, store, body).create(request, body)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, stream: bool = False,
                            store: ResponseStore = Depends(get_response_store)) -> dict:
    return serving.retrieve(store, response_id, stream)


@router.post("/v1/responses/{response_id}/cancel")
async def cancel_response(response_id: str, store: ResponseStore = Depends(get_response_store)) -> dict:
    return serving.cancel(store, response_id)
