"""Tool calling with vLLM's own parsers, as `vllm serve --tool-call-parser P [--enable-auto-tool-choice]`.

The parser named by the operator reads tool calls out of the model's text, whole or streamed. For
`tool_choice` "required" or a named function the parser first constrains the request (a JSON
schema of the calls, through vLLM's structured outputs), so the model can only write a call;
"auto" lets the model choose and needs `--enable-auto-tool-choice`. Guidance composes with all
of it: the grammar decides which tokens are allowed, guidance reweights the allowed ones.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.entrypoints.serve.utils.tool_calls_utils import maybe_filter_parallel_tool_calls
from vllm.parser import Parser, ParserManager

from server.errors import InvalidRequest


class ToolCalling:
    """The operator's tool parser for the served model, or none."""

    def __init__(self, parser_cls: type[Parser] | None, enable_auto: bool, tokenizer: Any) -> None:
        self._parser_cls = parser_cls
        self._enable_auto = enable_auto
        self._tokenizer = tokenizer

    @classmethod
    def load(cls, parser_name: str | None, enable_auto: bool, tokenizer: Any) -> "ToolCalling":
        """`parser_name` is one of vLLM's registered tool parsers (the settings check it)."""
        if parser_name is None:
            return cls(None, False, tokenizer)
        parser_cls = ParserManager.get_parser(
            tool_parser_name=parser_name, enable_auto_tools=enable_auto, tokenizer=tokenizer)
        return cls(parser_cls, enable_auto, tokenizer)

    def session(self, request: VllmChatRequest) -> "ToolSession | None":
        """The request's tool calling (None when it offers no tools or forbids calling them), after
        the checks vLLM's server makes; the parser may constrain `request` (it adjusts it in place)."""
        choice = request.tool_choice
        if not request.tools or choice in (None, "none"):
            return None
        if self._parser_cls is None or (choice == "auto" and not self._enable_auto):
            described = f'"{choice}"' if isinstance(choice, str) else f'function "{choice.function.name}"'
            needs = "--enable-auto-tool-choice and --tool-call-parser" if choice == "auto" else "--tool-call-parser"
            raise InvalidRequest(f"tool_choice {described} requires the server to run with {needs}.",
                                 param="tool_choice")
        adjusted = self._new_parser(request).adjust_request(request)
        return ToolSession(self, adjusted)

    def _new_parser(self, request: VllmChatRequest) -> Parser:
        return self._parser_cls(self._tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs)


@dataclass
class ToolSession:
    """One request's tool calling: a parser per choice (parsers keep streaming state)."""

    calling: ToolCalling
    request: VllmChatRequest

    def __post_init__(self) -> None:
        self._parsers: dict[int, Parser] = {}
        self._called: set[int] = set()

    def parse(self, text: str, token_ids: list[int]) -> tuple[str | None, list[dict]]:
        """A whole choice's content and tool calls (OpenAI's message.tool_calls)."""
        parser = self.calling._new_parser(self.request)
        _, content, calls = parser.parse(text, self.request, enable_auto_tools=self.calling._enable_auto,
                                         model_output_token_ids=token_ids)
        calls = maybe_filter_parallel_tool_calls(list(calls or ()), self.request)
        if self.request.tool_choice != "auto":  # vLLM: a call the request asked for comes with content ""
            content = content or ""
        return content, [{"id": call.id or _call_id(), "type": "function",
                          "function": {"name": call.name, "arguments": call.arguments}} for call in calls]

    def parse_delta(self, index: int, text: str, token_ids: tuple[int, ...], prompt_ids: list[int],
                    finished: bool) -> dict:
        """A streamed choice's delta message: content and tool-call fragments (OpenAI's chunk delta)."""
        parser = self._parsers.get(index)
        if parser is None:
            parser = self._parsers[index] = self.calling._new_parser(self.request)
        message = parser.parse_delta(text, list(token_ids), self.request, prompt_ids, finished=finished)
        if message is None:
            return {}
        message = maybe_filter_parallel_tool_calls(message, self.request)
        if message.tool_calls:
            self._called.add(index)
        return message.model_dump(exclude_none=True, include={"content", "tool_calls"})

    def finish_reason(self, finish_reason: str | None, called: bool) -> str | None:
        """OpenAI's finish reason, as vLLM's server gives it: "tool_calls" when the model chose to call
        tools ("auto"), or stopped after the calls it had to make ("required"); a named call keeps its own."""
        choice = self.request.tool_choice
        if finish_reason is None or not called or not isinstance(choice, str):
            return finish_reason
        return "tool_calls" if choice == "auto" or finish_reason == "stop" else finish_reason

    def streamed_calls(self, index: int) -> bool:
        """Whether streamed choice `index` has sent tool-call fragments."""
        return index in self._called


def _call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"
