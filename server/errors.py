"""API errors and their one mapping to the OpenAI error envelope.

Every error a client sees has the body
``{"error": {"message": str, "type": str, "param": str | None, "code": str | None}}``.

Exception tree (raise these from serving code; `install_error_handlers` maps them):

    APIError                      any error with an HTTP status
    ├── InvalidRequest            400 invalid_request_error (param names the field)
    │   └── ContextLengthExceeded 400, code "context_length_exceeded"
    ├── AuthenticationFailed      401 invalid_request_error, code "invalid_api_key"
    ├── ModelNotFound             404 invalid_request_error, code "model_not_found"
    ├── PayloadTooLarge           413 invalid_request_error
    ├── TooManyRequests           429 rate_limit_error, with a Retry-After header
    └── ServiceUnavailable        503 service_unavailable, code "draining" while shutting down, or:
        ├── EngineDead            code "engine_dead": vLLM's engine core died; the process exits for a restart
        ├── EngineTimeout         code "engine_timeout": a call to the engine's workers did not answer in time
        ├── ScorerTimeout         code "scorer_timeout": a search's scorer did not answer in time
        ├── DeadlineExceeded      code "deadline_exceeded": the request's deadline passed (timeout_s)
        └── RequestStalled        code "request_stalled": no progress while the engine held none of its work

A 503 means the request may be retried as it is: on another replica at once, or here once
/ready answers 200 again (after engine_dead: once the restarted server is ready).

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


class DeadlineExceeded(ServiceUnavailable):
    code = "deadline_exceeded"


class RequestStalled(ServiceUnavailable):
    code = "request_stalled"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def api_error_body(error: APIError) -> dict:
    return error_body(error.message, error.type, error.param, error.code)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(api_error_body(error), status_code=error.status, headers=error.headers)


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
    # deepest into the value names the member the client meant.
    first: dict[str, Any] = max(errors, key=lambda e: len(e.get("loc", ())), default={"loc": ()})
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
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(VLLMClientError)
    async def _vllm_client_error(_: Request, exc: VLLMClientError) -> JSONResponse:
        # vLLM's own types (a structured-outputs spec, ...) check themselves while a body is parsed.
        return error_response(vllm_client_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        return JSONResponse(error_body(message, type_), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)
