"""Request body of POST /v1/responses.

The fields are declared as vLLM's `ResponsesRequest` declares them, and a request is read through
vLLM's own model (`as_vllm_request`), which also runs its whole-request checks (`prompt`,
`tool_choice` without tools, `background` without `store`). vLLM's other fields (multimodal
payloads, KV and EC transfer, `cache_salt`, `priority`, `vllm_xargs`, `previous_input_messages`,
`enable_response_messages`, ...) are unknown fields here, as on chat. What the chat path cannot do
is a 400 naming where it was asked: tools and tool items, reasoning, non-text content,
`background`, `truncation: auto` and `include` entries other than output logprobs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, create_model, model_validator
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmResponsesRequest

from server.api.common import SamplingRequest, StrictModel
from server.api.vllm_fields import validate_vllm_request, vllm_fields
from server.errors import InvalidRequest

# Fields of vLLM's request that reach the chat path (sampling, prompt, output) or are echoed in the response;
# `input` is declared below, as the part of vLLM's type the chat path reads.
RESPONSE_FIELDS = (
    "model", "instructions", "max_output_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
    "stop", "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "structured_outputs", "text", "include",
    "top_logprobs", "stream", "store", "previous_response_id", "background", "tools", "tool_choice",
    "parallel_tool_calls", "max_tool_calls", "reasoning", "truncation", "prompt", "metadata", "user",
    "service_tier", "prompt_cache_key", "chat_template_kwargs",
)
# alignserve's own fields, beside the standard ones exactly as on chat.
EXTENSION_FIELDS = ("guidance", "max_kl", "kl_per_token", "search", "cache", "timeout_s")
OUTPUT_LOGPROBS = "message.output_text.logprobs"

# Input items the chat path has no place for, by type, and why.
_REFUSED_ITEMS = {
    "function_call": "function calls are not supported: this endpoint takes no tools",
    "function_call_output": "function call outputs are not supported: this endpoint takes no tools",
    "custom_tool_call": "custom tool calls are not supported: this endpoint takes no tools",
    "custom_tool_call_output": "custom tool call outputs are not supported: this endpoint takes no tools",
    "reasoning": "reasoning items are not supported: this server runs no reasoning parser",
}
# Content parts of a message that are not text, and why.
_REFUSED_PARTS = {
    "input_image": "image content is not supported: the served model reads text only",
    "input_file": "file content is not supported: the served model reads text only",
    "input_audio": "audio content is not supported: the served model reads text only",
    "refusal": "refusal content is not supported: an assistant message carries output_text",
}


class TextPart(StrictModel):
    """A message's text: `input_text` (what users and instructions say), `output_text` (what an
    assistant said, as a response gave it back)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # of output_text: ignored, as vLLM ignores them
    logprobs: list[Any] | None = None  # of output_text: ignored, as vLLM ignores them


class InputMessage(StrictModel):
    """A message of `input`: an easy input message (content a string or parts), an input message,
    or an earlier response's output message (with its `id` and `status`)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class _ResponseChecks(StrictModel):
    """The checks of what the chat path cannot do, each naming where it was asked."""

    @model_validator(mode="before")
    @classmethod
    def _text_messages_only(cls, data: Any) -> Any:
        """Input items other than messages, and message parts other than text (checked before pydantic
        reads `input`, whose dozens of item types would otherwise each report their own mismatch)."""
        items = data.get("input") if isinstance(data, dict) else None
        for i, item in enumerate(items if isinstance(items, list) else ()):
            if not isinstance(item, dict):
                continue
            kind = item.get("type", "message")
            if kind != "message":
                reason = _REFUSED_ITEMS.get(kind, f"input items of type {kind!r} are not supported: "
                                                  "only messages with text content are")
                raise InvalidRequest(f"{reason}.", param=f"input[{i}]")
            content = item.get("content")
            for j, part in enumerate(content if isinstance(content, list) else ()):
                if isinstance(part, dict) and (reason := _REFUSED_PARTS.get(part.get("type"))) is not None:
                    raise InvalidRequest(f"{reason}.", param=f"input[{i}].content[{j}]")
        return data

    @model_validator(mode="after")
    def _supported(self) -> _ResponseChecks:
        if self.tools:
            raise InvalidRequest("tools are not supported on /v1/responses: use /v1/chat/completions with "
                                 "--tool-call-parser for tool calling.", param="tools")
        if self.background:
            raise InvalidRequest("background responses are not supported: this server answers each response "
                                 "in the request that created it.", param="background")
        if self.reasoning is not None and (self.reasoning.effort not in (None, "none") or self.reasoning.summary):
            raise InvalidRequest("reasoning is not supported: this server runs no reasoning parser.",
                                 param="reasoning")
        if self.truncation == "auto":
            raise InvalidRequest("only truncation 'disabled' is supported: an input over the context length is "
                                 "a 400.", param="truncation")
        for i, entry in enumerate(self.include or ()):
            if entry != OUTPUT_LOGPROBS:
                raise InvalidRequest(f"only {OUTPUT_LOGPROBS!r} can be included: this endpoint runs no tools "
                                     "and reads no images.", param=f"include[{i}]")
        return self


_ResponseFields = create_model("ResponseFields", __base__=_ResponseChecks,
                               **vllm_fields(VllmResponsesRequest, RESPONSE_FIELDS),
                               input=(str | list[InputMessage], Field()),
                               **vllm_fields(SamplingRequest, EXTENSION_FIELDS))


class ResponsesRequest(_ResponseFields):
    @property
    def wants_logprobs(self) -> bool:
        return OUTPUT_LOGPROBS in (self.include or ())

    def as_vllm_request(self, response_id: str) -> VllmResponsesRequest:
        """This request as vLLM's own request model reads it, named `response_id` (the response's id)."""
        names = (VllmResponsesRequest.model_fields.keys() & type(self).model_fields.keys()) - {"input"}
        fields = self.model_dump(include=names, exclude_unset=True, by_alias=True)
        # Each message with its `type`: vLLM reads an assistant's output_text parts by it.
        fields["input"] = self.input if isinstance(self.input, str) else [
            message.model_dump(exclude_none=True) for message in self.input]
        return validate_vllm_request(VllmResponsesRequest, {**fields, "request_id": response_id})
