"""Logic of POST /v1/messages and POST /v1/messages/count_tokens.

A message request runs as the chat completion vLLM's server turns it into, through the chat path
(engine, guidance, search, response cache, admission, deadline, disconnect), asking for the token ids
the stop sequence is found from; the completion, whole or streamed, is then turned into Anthropic's
message or message stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server.api.chat.protocol import ChatCompletionRequest
from server.api.chat.serving import ChatPrepared, ChatServing
from server.api.messages.convert import chat_fields, message, stop_sequence
from server.api.messages.events import MessageEvents, event
from server.api.messages.protocol import EXTENSION_FIELDS, AnthropicRequest, CountTokensRequest, MessagesRequest
from server.errors import APIError, anthropic_error_body, validation_error
from server.tracking import TrackedRequest


class MessagesServing(ChatServing):
    endpoint = "message"  # the request tracker's name for it (the chat path runs it)

    async def create(self, request: Request, body: MessagesRequest) -> Response:
        chat = self.chat_request(body)
        response = await self.serve(request, chat)
        if not isinstance(response, JSONResponse):
            return response  # a stream (converted by `stream` and `replay`), or nobody left to answer
        completion = json.loads(response.body)
        choice = completion["choices"][0]
        stop = self._stop_sequence(chat, choice["token_ids"]) if choice["finish_reason"] == "stop" else None
        return JSONResponse(message(completion, stop))

    def count_tokens(self, body: CountTokensRequest) -> dict[str, int | dict[str, int]]:
        """The prompt's tokens, rendered as the message request would render it (vLLM's shape)."""
        self.services.check_model(body.model)
        chat = self.chat_request(body)
        input_tokens = len(self.render(chat, chat.as_vllm_request()))
        return {"input_tokens": input_tokens, "context_management": {"original_input_tokens": input_tokens}}

    def chat_request(self, body: AnthropicRequest) -> ChatCompletionRequest:
        """The chat completion request of a message (or count_tokens) request, with our own fields."""
        fields = chat_fields(body.as_vllm_request(), self.services.renderer.tokenizer.chat_template)
        fields.update(model=body.model, return_token_ids=True,
                      **body.model_dump(include=set(EXTENSION_FIELDS), exclude_unset=True))
        if getattr(body, "stream", False):
            fields.update(stream=True, stream_options={"include_usage": True})
        try:
            return ChatCompletionRequest.model_validate(fields)
        except ValidationError as exc:  # a bound the chat path sets where vLLM's Anthropic model has none
            raise validation_error(RequestValidationError(exc.errors())) from exc

    def stream(self, body: ChatCompletionRequest, prepared: ChatPrepared, cache_key: str | None,
               record: TrackedRequest) -> AsyncIterator[str]:
        return self._events(body).convert(super().stream(body, prepared, cache_key, record))

    def replay(self, body: ChatCompletionRequest, prepared: ChatPrepared, cached: dict) -> AsyncIterator[str]:
        return self._events(body).convert(super().replay(body, prepared, cached))

    def error_event(self, error: APIError) -> str:
        return event("error", anthropic_error_body(error))

    def _events(self, body: ChatCompletionRequest) -> MessageEvents:
        return MessageEvents(lambda token_ids: self._stop_sequence(body, token_ids))

    def _stop_sequence(self, body: ChatCompletionRequest, token_ids: list[int]) -> str | None:
        decode = self.services.renderer.decode
        return stop_sequence(body.stop or (), token_ids, lambda ids: decode(ids, skip_special_tokens=True))
