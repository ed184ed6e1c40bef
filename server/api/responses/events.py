"""A streamed chat completion as the Responses event stream, as vLLM's server streams plain text
(its `emit_simple_content_*` events, numbered in order).

response.created and response.in_progress (on the chat stream's opening chunk); on the first text,
response.output_item.added and response.content_part.added; response.output_text.delta per delta;
when the choice ends, response.output_text.done, response.content_part.done and
response.output_item.done; then response.completed (on the chat stream's usage chunk) with the
whole response, its `usage` and, for a guided or searched request, its `guidance`. No [DONE]. A
request that fails mid-stream ends with OpenAI's `error` event (`code`, `message`, `param`) and
nothing after it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

from openai.types.responses import ResponseErrorEvent, ResponseOutputItemDoneEvent
from pydantic import BaseModel
from vllm.entrypoints.openai.responses.protocol import ResponseCompletedEvent, ResponseCreatedEvent
from vllm.entrypoints.openai.responses.protocol import ResponseInProgressEvent, ResponsesResponse
from vllm.entrypoints.openai.responses.streaming_events import (
    SimpleStreamingState,
    emit_simple_content_delta,
    emit_simple_content_done,
    emit_simple_content_open,
)

from server.api.responses.convert import Turn, logprobs
from server.api.streaming import SSE_DONE


def event(payload: BaseModel) -> str:
    """One Responses server-sent event, named by its type (vLLM's framing)."""
    return f"event: {payload.type}\ndata: {payload.model_dump_json(indent=None, by_alias=True)}\n\n"


class ResponseEvents:
    """The conversion of one chat stream (one choice) for `turn`; `summary` is the request's resolved
    guidance (None when unguided), `finished` receives the completed response."""

    def __init__(self, turn: Turn, summary: dict | None, finished: Callable[[ResponsesResponse], None]) -> None:
        self._turn = turn
        self._summary = summary
        self._finished = finished
        self._state = SimpleStreamingState()
        self._text_open = False
        self._sequence = 0
        self._output: list = []
        self._finish_reason: str | None = None
        self._guidance: dict | None = None

    async def convert(self, chat_events: AsyncIterator[str]) -> AsyncIterator[str]:
        async for chat_event in chat_events:
            if chat_event == SSE_DONE:
                continue
            payload = json.loads(chat_event.removeprefix("data: "))
            if "error" in payload:  # the chat path's error event: the stream ends here
                error = payload["error"]
                yield self._numbered(ResponseErrorEvent(type="error", code=error["code"], message=error["message"],
                                                        param=error["param"], sequence_number=-1))
                return
            for converted in self._chunk(payload):
                yield self._numbered(converted)

    def _numbered(self, payload: BaseModel) -> str:
        payload.sequence_number = self._sequence
        self._sequence += 1
        return event(payload)

    def _chunk(self, chunk: dict) -> Iterator[BaseModel]:
        if not chunk["choices"]:  # the usage chunk: the choice is over
            yield from self._close_text()
            guidance = {**self._guidance, **(self._summary or {})} if self._guidance is not None else None
            response = self._turn.response(self._output, self._finish_reason or "stop", chunk["usage"], guidance)
            self._finished(response)
            yield ResponseCompletedEvent(type="response.completed", sequence_number=-1, response=response)
            return
        choice = chunk["choices"][0]
        if "role" in choice["delta"]:  # the opening chunk
            initial = self._turn.response([], None).model_dump(mode="json", by_alias=True)
            yield ResponseCreatedEvent(type="response.created", sequence_number=-1, response=initial)
            yield ResponseInProgressEvent(type="response.in_progress", sequence_number=-1, response=initial)
            return
        self._finish_reason = choice["finish_reason"] or self._finish_reason
        self._guidance = choice.get("guidance", self._guidance)
        if text := choice["delta"].get("content"):
            if not self._text_open:
                self._text_open = True
                yield from emit_simple_content_open(self._state)
            yield from emit_simple_content_delta(self._state, text, logprobs(choice["logprobs"]))

    def _close_text(self) -> Iterator[BaseModel]:
        if self._text_open:
            self._text_open = False
            for done in emit_simple_content_done(self._state):
                if isinstance(done, ResponseOutputItemDoneEvent):
                    self._output.append(done.item)
                yield done
