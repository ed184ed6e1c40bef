"""Request bodies of POST /v1/messages and POST /v1/messages/count_tokens.

The fields are declared as vLLM's Anthropic request models declare them, and a request is read
through vLLM's own model (`as_vllm_request`), which also runs its whole-request checks. vLLM's
other fields (multimodal payloads, KV and EC transfer, `cache_salt`, `watermarking`,
`vllm_xargs`) are unknown fields here, as on chat. What the chat path cannot do is a 400 naming
where it was asked: images (the served model reads text), `thinking` blocks and `thinking`
"enabled" (no reasoning parser; vLLM's engine refuses its thinking budget without one too).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, create_model, field_validator, model_validator
from vllm.entrypoints.anthropic.protocol import AnthropicCountTokensRequest as VllmCountTokensRequest
from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest as VllmMessagesRequest

from server.api.common import SamplingRequest, StrictModel
from server.api.vllm_fields import validate_vllm_request, vllm_fields
from server.errors import InvalidRequest

# Fields of vLLM's count_tokens request; a message request adds its sampling fields.
COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking", "output_config",
                "chat_template_kwargs")
MESSAGE_FIELDS = (*COUNT_FIELDS, "max_tokens", "stop_sequences", "temperature", "top_p", "top_k", "stream",
                  "metadata")
# alignserve's own fields, beside the standard ones exactly as on chat.
EXTENSION_FIELDS = ("guidance", "max_kl", "kl_per_token", "search", "cache", "timeout_s")

# Content the chat path has no place for, and why.
_REFUSED_BLOCKS = {
    "image": "image content is not supported: the served model reads text only",
    "thinking": "thinking blocks are not supported: this server runs no reasoning parser",
    "tool_reference": "tool_reference results are not supported: a tool result is text here",
}


class AnthropicRequest(StrictModel):
    """What both requests share: vLLM's model of them, and the content checks."""

    vllm_request: ClassVar[type[BaseModel]]

    @model_validator(mode="after")
    def _supported(self) -> AnthropicRequest:
        if getattr(self.thinking, "type", None) == "enabled":
            raise InvalidRequest("extended thinking is not supported: this server runs no reasoning parser "
                                 "(vLLM refuses a thinking budget without --reasoning-parser too).", param="thinking")
        _check_blocks(self.system if isinstance(self.system, list) else [], "system")
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                _check_blocks(message.content, f"messages[{i}].content")
        return self

    def as_vllm_request(self) -> BaseModel:
        """This request as vLLM's own request model reads it."""
        names = self.vllm_request.model_fields.keys() & type(self).model_fields.keys()
        return validate_vllm_request(self.vllm_request,
                                     self.model_dump(include=names, exclude_unset=True, by_alias=True))


def _check_blocks(blocks: list, param: str) -> None:
    """400 for the first block (or tool_result content item) of a refused type."""
    for j, block in enumerate(blocks):
        _check_type(block.type, f"{param}[{j}]")
        if block.type == "tool_result" and isinstance(block.content, list):
            for k, item in enumerate(block.content):
                _check_type(item.get("type"), f"{param}[{j}].content[{k}]")


def _check_type(block_type: str | None, param: str) -> None:
    if (reason := _REFUSED_BLOCKS.get(block_type)) is not None:
        raise InvalidRequest(f"{reason}.", param=param)


_MessageFields = create_model("MessageFields", __base__=AnthropicRequest,
                              **vllm_fields(VllmMessagesRequest, MESSAGE_FIELDS),
                              **vllm_fields(SamplingRequest, EXTENSION_FIELDS))
_CountFields = create_model("CountTokensFields", __base__=AnthropicRequest,
                            **vllm_fields(VllmCountTokensRequest, COUNT_FIELDS))


class MessagesRequest(_MessageFields):
    vllm_request = VllmMessagesRequest

    @field_validator("stop_sequences")
    @classmethod
    def _stop_sequences_not_empty(cls, stops: list[str] | None) -> list[str] | None:
        if stops and "" in stops:
            raise ValueError("stop sequences cannot be empty strings")  # as vLLM's SamplingParams refuses them
        return stops


class CountTokensRequest(_CountFields):
    vllm_request = VllmCountTokensRequest
