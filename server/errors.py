"""API errors and their one mapping to the error envelopes.

Every error a client sees has the body
``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}`` (OpenAI's),
or under /v1/messages Anthropic's ``{"type": "error", "error": {"type": str, "message": str}}``,
its type chosen by the HTTP status and its message starting with the field it is about.

Exception tree (raise these from serving code; `install_error_handlers` maps them):

    APIError                      any error with an HTTP status
    ├── InvalidRequest            400 invalid_request_error (param names the field)
    │   └── ContextLengthExceeded 400, code "context_length_exceeded"
    ├── AuthenticationFailed      401 invalid_request_error, code "invalid_api_key"
    ├── ModelNotFound             404 invalid_request_error, code "model_not_found"
    ├── ResponseNotFound          404 invalid_request_error: no stored response has the id (/v1/responses)
    ├── PayloadTooLarge           413 invalid_request_error
    ├── TooManyRequests           429 rate_limit_error, with a Retry-After header
    ├── BadGateway                502 bad_gateway, code "scorer_bad_response": a remote scorer refused the
    │                             request (4xx) or answered without a score per candidate
    └── ServiceUnavailable        503 service_unavailable, code "draining" while shutting down, or:
        ├── EngineDead            code "engine_dead": vLLM's engine core died; the process exits for a restart
        ├── EngineTimeout         code "engine_timeout": a call to the engine's workers did not answer in time
        ├── ScorerTimeout         code "scorer_timeout": a search's scorer did not answer in time
        ├── ScorerUnavailable     code "scorer_unavailable": a remote scorer could not be reached, or answered
        │                         5xx, on every attempt
        ├── DeadlineExceeded      code "deadline_exceeded": the request's deadline passed (timeout_s)
        └── RequestStalled        code "request_stalled": no progress while the engine held none of its work

A 503 means the request may be retried as it is: on another replica at once, or here once
/ready answers 200 again (after engine_dead: once the restarted server is ready). A 502 will fail
again until the operator fixes the scorer's configuration or server.

pydantic validation errors become 400 with `param` set to the exact field path
(e.g. ``messages[0].content``, ``guidance[0].strength``), never 422.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from vllm.exceptions import VLLMClientError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(APIError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", param="model")


class ResponseNotFound(APIError):
    status = 404
    type = "invalid_request_error"

    def __init__(self, response_id: str, *, param: str) -> None:
        super().__init__(f"Response with id '{response_id}' not found.", param=param)  # vLLM's message


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    headers = {"WWW-Authenticate": "Bearer"}


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class BadGateway(APIError):
    status = 502
    type = "bad_gateway"
    code = "scorer_bad_response"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable"


class EngineDead(ServiceUnavailable):
    code = "engine_dead"

    def __init__(self) -> None:
        super().__init__("The inference engine stopped unexpectedly; this server is restarting. Retry the request.")


class EngineTimeout(ServiceUnavailable):
    code = "engine_timeout"


class ScorerTimeout(ServiceUnavailable):
    code = "scorer_timeout"


class ScorerUnavailable(ServiceUnavailable):
    code = "scorer_unavailable"


class DeadlineExceeded(ServiceUnavailable):
    code = "deadline_exceeded"


class RequestStalled(ServiceUnavailable):
    code = "request_stalled"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_body(error: APIError) -> dict:
    return error_body(error.message, error.type, error.param, error.code)


# Anthropic's error types by HTTP status (any other: "invalid_request_error" for a 4xx, "api_error" for a 5xx).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error"}
MESSAGES_PATH = "/v1/messages"


def is_messages_path(path: str) -> bool:
    """Whether `path` belongs to Anthropic's Messages API, whose clients read its error envelope."""
    return path == MESSAGES_PATH or path.startswith(f"{MESSAGES_PATH}/")


def anthropic_error_body(error: APIError) -> dict:
    """Anthropic's envelope. It has no `param`, so the message starts with the field, written as
    Anthropic writes it (`messages.0.content: ...`)."""
    message = error.message
    if error.param is not None:
        message = f"{error.param.replace('[', '.').replace(']', '')}: {message}"
    default = "invalid_request_error" if error.status < 500 else "api_error"
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(error.status, default), "message": message}}


def error_response(error: APIError, path: str = "") -> JSONResponse:
    """The error in the envelope of the API that `path` belongs to."""
    body = anthropic_error_body(error) if is_messages_path(path) else api_error_body(error)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# pydantic inserts the tried member type of a union into error locations
# (e.g. ("prompt", "list[int]", 0)); they are not field names.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict)$|[\[\-]")


def field_path(loc: Sequence[str | int]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _TYPE_TAG.search(part):
            path += f".{part}" if path else part
    return path or None


def validation_error(exc: RequestValidationError) -> InvalidRequest:
    """The first pydantic error, as a 400 naming its field."""
    errors = exc.errors()
    # A value that fits no member of a union fails once per member; the error that got
    # deepest into the value names the member the client meant, and at equal depth one that is not a
    # type mismatch does (a list of too many strings: "at most 4 items", not "should be a string").
    first: dict[str, Any] = max(errors, key=lambda e: (len(e.get("loc", ())), not e.get("type", "").endswith("_type")),
                                default={"loc": ()})
    if first.get("type") == "json_invalid":
        return InvalidRequest("The request body is not valid JSON.", code="invalid_json")
    param = field_path(first.get("loc", ()))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif first.get("type") == "missing":
        message = f"Missing required parameter: {param}"
    elif first.get("type") == "model_attributes_type" and param is None:
        message = "The request body must be a JSON object."
    elif param:
        message = f"Invalid value for '{param}': {message}"
    return InvalidRequest(message, param=param)


def vllm_client_error(exc: VLLMClientError | ValueError) -> InvalidRequest:
    """vLLM's refusal of a request field (its VLLMValidationError names the parameter) as a 400."""
    return InvalidRequest(exc.args[0] if exc.args else str(exc), param=getattr(exc, "parameter", None))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), request.url.path)

    @app.exception_handler(VLLMClientError)
    async def _vllm_client_error(request: Request, exc: VLLMClientError) -> JSONResponse:
        # vLLM's own types (a structured-outputs spec, ...) check themselves while a body is parsed.
        return error_response(vllm_client_error(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase)
        error.status, error.headers = exc.status_code, getattr(exc, "headers", None)
        if exc.status_code < 500:
            error.type = "invalid_request_error"
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(APIError("Internal server error."), request.url.path)
