"""GET /debug/requests: the in-flight requests by stage and the server's asyncio tasks (server.diagnostics).

Served only when the operator sets --debug-key, and only to `Authorization: Bearer <debug key>`: the
dump names internal request ids and code locations, which are for operators, not clients.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from server.diagnostics import state_dump
from server.errors import AuthenticationFailed
from server.middleware import bearer_matches
from server.services import Services, get_services

DEBUG_PATH = "/debug/requests"

router = APIRouter()


@router.get(DEBUG_PATH)
async def debug_requests(request: Request, services: Services = Depends(get_services)) -> JSONResponse:
    key = services.settings.debug_key
    if not bearer_matches(request.headers.get("authorization", "").encode(), [key.encode()]):
        raise AuthenticationFailed("Incorrect or missing debug key. Send 'Authorization: Bearer <debug key>'.")
    return JSONResponse(state_dump(services.tracker))
