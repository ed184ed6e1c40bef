"""A streamed chat completion as Anthropic's message stream, converted event by event as vLLM's server
converts it (`message_stream_converter`).

message_start (on the chat stream's opening chunk), then per content block content_block_start,
content_block_delta (`text_delta`, or `input_json_delta` for a tool call's arguments) and
content_block_stop, then message_delta with the stop reason, the usage and, for a guided or
searched request, the choice's `guidance` report (on the chat stream's usage chunk), and
message_stop (on its [DONE]). A request that fails mid-stream ends with Anthropic's `error`
event, already written by the serving, and nothing after it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator

from vllm.entrypoints.anthropic.serving import _is_json, wrap_data_with_event

from server.api.messages.convert import message_id, stop_fields, usage
from server.api.streaming import SSE_DONE

ERROR_EVENT = "event: error\n"


def event(name: str, payload: dict) -> str:
    """One Anthropic server-sent event: its name, and its payload with the name as its `type`."""
    return wrap_data_with_event(json.dumps({"type": name, **payload}, ensure_ascii=False, separators=(",", ":")),
                                name)


class MessageEvents:
    """The conversion of one chat stream (one choice, its chunks carrying token ids); `find_stop` names the
    stop sequence that ended a choice of these tokens, if one did."""

    def __init__(self, find_stop: Callable[[list[int]], str | None]) -> None:
        self._find_stop = find_stop
        self._blocks = 0  # content blocks started
        self._open: str | None = None  # type of the open block
        self._tool_id: str | None = None  # id of the open tool_use block
        self._tool_ids: dict[int, str] = {}  # tool call index -> id
        self._tool_arguments = ""  # of the last tool_use block
        self._tool_used = False
        self._token_ids: list[int] = []
        self._finish_reason: str | None = None
        self._guidance: dict | None = None

    async def convert(self, chat_events: AsyncIterator[str]) -> AsyncIterator[str]:
        failed = False
        async for chat_event in chat_events:
            if chat_event.startswith(ERROR_EVENT):
                failed = True
                yield chat_event
            elif chat_event == SSE_DONE:
                if not failed:
                    yield event("message_stop", {})
            else:
                for converted in self._chunk(json.loads(chat_event.removeprefix("data: "))):
                    yield converted

    def _chunk(self, chunk: dict) -> Iterator[str]:
        if not chunk["choices"]:  # the usage chunk: the choice is over
            yield from self._close_block()
            yield event("message_delta", self._message_delta(chunk["usage"]))
            return
        choice = chunk["choices"][0]
        delta = choice["delta"]
        if "role" in delta:  # the opening chunk
            yield event("message_start", {"message": {
                "id": message_id(chunk["id"]), "type": "message", "role": "assistant", "content": [],
                "model": chunk["model"], "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": len(chunk["prompt_token_ids"]), "output_tokens": 0}}})
            return
        self._token_ids += choice.get("token_ids", ())
        self._finish_reason = choice["finish_reason"] or self._finish_reason
        self._guidance = choice.get("guidance", self._guidance)
        if delta.get("content"):
            yield from self._text(delta["content"])
        for call in delta.get("tool_calls", ()):
            yield from self._tool_call(call)

    def _text(self, text: str) -> Iterator[str]:
        if self._open != "text":
            yield from self._close_block()
            yield self._open_block({"type": "text", "text": ""})
        yield self._delta({"type": "text_delta", "text": text})

    def _tool_call(self, call: dict) -> Iterator[str]:
        """A tool call fragment: the first of a call (its id and name) opens a tool_use block, each
        fragment's arguments are an input_json_delta of it."""
        function = call.get("function") or {}
        if call.get("id") is not None:
            self._tool_ids[call["index"]] = call["id"]
            if function.get("name") is not None and call["id"] != self._tool_id:
                yield from self._close_block()
                self._tool_used, self._tool_arguments = True, ""
                yield self._open_block({"type": "tool_use", "id": call["id"], "name": function["name"], "input": {}})
                self._tool_id = call["id"]
        call_id = self._tool_ids.get(call["index"])
        if function.get("arguments") and call_id is not None and call_id == self._tool_id:
            self._tool_arguments += function["arguments"]
            yield self._delta({"type": "input_json_delta", "partial_json": function["arguments"]})

    def _open_block(self, block: dict) -> str:
        self._open = block["type"]
        self._blocks += 1
        return event("content_block_start", {"index": self._blocks - 1, "content_block": block})

    def _delta(self, delta: dict) -> str:
        return event("content_block_delta", {"index": self._blocks - 1, "delta": delta})

    def _close_block(self) -> Iterator[str]:
        if self._open is not None:
            yield event("content_block_stop", {"index": self._blocks - 1})
        self._open = self._tool_id = None

    def _message_delta(self, chat_usage: dict) -> dict:
        stop = self._find_stop(self._token_ids) if self._finish_reason == "stop" else None
        delta = {"delta": stop_fields(self._finish_reason or "stop", stop, tool_used=self._tool_used,
                                      tool_complete=self._tool_used and _is_json(self._tool_arguments)),
                 "usage": usage(chat_usage)}
        if self._guidance is not None:
            delta["guidance"] = self._guidance
        return delta
