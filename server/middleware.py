"""ASGI middleware: API keys, request body size, and request outcome metrics.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and client-disconnect
detection pass through untouched.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.errors import AuthenticationFailed, PayloadTooLarge, error_response, is_messages_path
from server.metrics import REQUESTS

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/messages": "messages",
                    "/v1/responses": "responses"}


class ApiKeyAuth:
    """Requires ``Authorization: Bearer <key>`` with one of `keys` outside `open_paths`; Anthropic's
    Messages API also takes the key as ``x-api-key: <key>``, which is how Anthropic's SDKs send it."""

    def __init__(self, app: ASGIApp, keys: list[str], open_paths: frozenset[str]) -> None:
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        send_key = "'Authorization: Bearer <key>'"
        if is_messages_path(scope["path"]):
            send_key = f"'x-api-key: <key>' or {send_key}"
        error = AuthenticationFailed(f"Incorrect or missing API key. Send {send_key}.")
        await error_response(error, scope["path"])(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        headers = dict(scope["headers"])
        if bearer_matches(headers.get(b"authorization", b""), self.keys):
            return True
        return is_messages_path(scope["path"]) and key_matches(headers.get(b"x-api-key", b""), self.keys)


def bearer_matches(header: bytes, keys: list[bytes]) -> bool:
    """Whether an Authorization header is `Bearer <one of keys>`."""
    scheme, _, token = header.partition(b" ")
    return key_matches(token, keys) and scheme.lower() == b"bearer"


def key_matches(token: bytes, keys: list[bytes]) -> bool:
    """Whether `token` is one of `keys`, compared with every key in constant time."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.strip(), key)
    return matched


class BodySizeLimit:
    """413 for a request body over `max_bytes`, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(self._error(), scope["path"])(scope, receive, send)
            return
        received, too_large = 0, False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # End the body here; whatever the app answers to it is replaced by a 413.
                    too_large = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def checked_send(message: Message) -> None:
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start":
                await error_response(self._error(), scope["path"])(scope, receive, send)

        await self.app(scope, limited_receive, checked_send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes.")


class RequestOutcomes:
    """Counts generation requests by endpoint and outcome (from the response status)."""

    OUTCOMES = {200: "success", 401: "unauthorized", 413: "invalid", 429: "rejected", 499: "aborted",
                503: "unavailable"}

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = GENERATION_PATHS.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            outcome = self.OUTCOMES.get(status) or ("invalid" if 400 <= status < 500 else "error")
            REQUESTS.labels(endpoint, outcome).inc()
