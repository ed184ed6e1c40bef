"""Request body of POST /v1/chat/completions."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, create_model, field_validator
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest

from server.api.common import SamplingRequest, StrictModel
from server.api.vllm_fields import CHAT_FIELDS, vllm_fields


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # a JSON object, as a string (OpenAI)


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    # Fields in validation order: each check names the field it is about.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = Field(default=None, validate_default=True)  # a tool's answer to that call
    name: str | None = None
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = Field(default=None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _only_assistants_call_tools(cls, tool_calls: list[ToolCall] | None, info: ValidationInfo):
        if tool_calls and info.data.get("role") != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return tool_calls

    @field_validator("tool_call_id")
    @classmethod
    def _tool_messages_answer_a_call(cls, tool_call_id: str | None, info: ValidationInfo) -> str | None:
        if (info.data.get("role") == "tool") != (tool_call_id is not None):
            raise ValueError("tool messages, and only they, carry tool_call_id (the call they answer)")
        return tool_call_id

    @field_validator("content")
    @classmethod
    def _content_or_tool_calls(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return content

    def template_message(self) -> dict[str, Any]:
        """The message as chat templates take it: plain text ("" for none, as vLLM renders it),
        'developer' read as 'system', and tool-call arguments as objects (templates render them;
        the API sends JSON strings)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": call.id, "type": call.type,
                 "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
                for call in self.tool_calls
            ]
        return message


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # a model may have written invalid JSON; the template gets it verbatim


# vLLM's chat-template and tool fields, declared as vLLM declares them.
_VllmChatFields = create_model("VllmChatFields", __base__=SamplingRequest, **vllm_fields(VllmChatRequest, CHAT_FIELDS))


class ChatCompletionRequest(_VllmChatFields):
    vllm_request = VllmChatRequest

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(default=None, ge=1, description="Deprecated alias of max_completion_tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @property
    def completion_limit(self) -> tuple[int | None, str]:
        """The completion token limit and the field it came from."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """Top alternatives per token for the engine; None when no logprobs are wanted."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]
