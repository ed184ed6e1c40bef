"""Logic of POST /v1/responses, GET /v1/responses/{id} and POST /v1/responses/{id}/cancel.

A response request runs as the chat completion of its conversation (built as vLLM builds it),
through the chat path (engine, guidance, search, response cache, admission, deadline, disconnect);
the completion, whole or streamed, is then turned into vLLM's response object or event stream, and
kept in the response store when `store` asks for it (server.api.responses.store). Responses run in
the request that creates them (no `background`), so a stored response is always finished: GET
returns it, and cancel answers as vLLM answers for a response that was not made in the background.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from vllm.entrypoints.openai.responses.protocol import ResponsesResponse

from server.api.chat.protocol import ChatCompletionRequest
from server.api.chat.serving import ChatPrepared, ChatServing
from server.api.responses.convert import Turn, chat_fields, completion_response, conversation, responses_param
from server.api.responses.events import ResponseEvents
from server.api.responses.protocol import ResponsesRequest
from server.api.responses.store import ResponseStore, StoredResponse
from server.errors import APIError, InvalidRequest, ResponseNotFound, validation_error
from server.services import Services
from server.tracking import TrackedRequest


class ResponsesServing(ChatServing):
    endpoint = "response"

    def __init__(self, services: Services, store: ResponseStore, turn: Turn, stored: bool) -> None:
        super().__init__(services)
        self.store = store
        self.turn = turn
        self.stored = stored  # keep the response once it is finished

    @classmethod
    def start(cls, services: Services, store: ResponseStore, body: ResponsesRequest) -> ResponsesServing:
        """The serving of one response request: its model checked, its conversation built (after the
        previous response's, if it names one)."""
        model = body.model if body.model is not None else services.settings.model_name  # vLLM's default
        services.check_model(model)
        request = body.as_vllm_request(f"resp_{uuid.uuid4().hex}")
        previous = _previous(store, body.previous_response_id)
        turn = Turn(request, conversation(request, previous), model, int(time.time()))
        return cls(services, store, turn, stored=bool(body.store))

    async def create(self, request: Request, body: ResponsesRequest) -> Response:
        try:
            response = await self.serve(request, self.chat_request(body))
        except APIError as exc:  # errors of the chat path name the Responses field the client set
            name_responses_field(exc)
            raise
        if not isinstance(response, JSONResponse):
            return response  # a stream (converted by `stream` and `replay`), or nobody left to answer
        result = completion_response(self.turn, json.loads(response.body))
        self.finished(result)
        return JSONResponse(result.model_dump(mode="json", by_alias=True))

    def chat_request(self, body: ResponsesRequest) -> ChatCompletionRequest:
        fields = chat_fields(body, self.turn.request, self.turn.conversation, self.turn.model)
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:  # a bound the chat path sets where vLLM's Responses model has none
            raise validation_error(RequestValidationError(exc.errors())) from exc

    def prepare(self, body: ChatCompletionRequest) -> ChatPrepared:
        prepared = super().prepare(body)
        self.turn.max_tokens = prepared.prompts[0].options.max_tokens  # the response reports it
        return prepared

    def finished(self, response: ResponsesResponse) -> None:
        if self.stored:
            self.store.put(StoredResponse(response.model_dump(mode="json", by_alias=True), self.turn.conversation))

    def stream(self, body: ChatCompletionRequest, prepared: ChatPrepared, cache_key: str | None,
               record: TrackedRequest) -> AsyncIterator[str]:
        return self._events(prepared).convert(super().stream(body, prepared, cache_key, record))

    def replay(self, body: ChatCompletionRequest, prepared: ChatPrepared, cached: dict) -> AsyncIterator[str]:
        return self._events(prepared).convert(super().replay(body, prepared, cached))

    def _events(self, prepared: ChatPrepared) -> ResponseEvents:
        return ResponseEvents(self.turn, prepared.guidance_summary() if prepared.reports else None, self.finished)


def retrieve(store: ResponseStore, response_id: str, stream: bool) -> dict:
    """A stored response. Only a background response's events can be streamed again (vLLM keeps
    them), and none runs here."""
    stored = _stored(store, response_id, param="response_id")
    if stream:
        raise InvalidRequest("Only background responses can be streamed again, and this server runs none: "
                             "retrieve the response without stream.", param="stream")
    return stored.response


def cancel(store: ResponseStore, response_id: str) -> dict:
    """vLLM cancels only queued or running background responses; every stored response here is finished."""
    _stored(store, response_id, param="response_id")
    raise InvalidRequest("Cannot cancel a synchronous response.", param="response_id")  # vLLM's answer


def _previous(store: ResponseStore, response_id: str | None) -> StoredResponse | None:
    if response_id is None:
        return None
    if not store.enabled:
        raise InvalidRequest("previous_response_id needs stored responses, and this server keeps none "
                             "(--responses-store-max-entries 0): send the whole conversation as input.",
                             param="previous_response_id")
    return _stored(store, response_id, param="previous_response_id")


def _stored(store: ResponseStore, response_id: str, param: str) -> StoredResponse:
    stored = store.get(response_id)
    if stored is None:
        raise ResponseNotFound(response_id, param=param)
    return stored


def name_responses_field(error: APIError) -> None:
    """Have `error` name the Responses field that the chat completion field it names came from."""
    param = responses_param(error.param)
    if param != error.param:
        error.message = error.message.replace(error.param, param)
        error.param = param
