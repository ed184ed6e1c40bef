"""An Anthropic message request as a chat completion request, and a chat completion as a message.

The request side is vLLM's own conversion (`AnthropicServingMessages.to_chat_completion_request`),
so a message is prompted exactly as on vLLM's server; the response side follows vLLM's too
(`messages_full_converter`, `_to_anthropic_stop_reason`), plus the stop sequence that ended
the text, which vLLM's engine reports and ours leaves to be found from the tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

from pydantic import BaseModel
from vllm.entrypoints.anthropic.serving import AnthropicServingMessages, _to_anthropic_stop_reason

# The chat completion fields vLLM's conversion sets that the chat path reads; of the others,
# `reasoning_effort` (from `thinking` "disabled" and `output_config.effort`) only reaches the chat
# template of a reasoning model, which this server does not serve.
CHAT_FIELDS = frozenset({"messages", "max_tokens", "stop", "temperature", "top_p", "top_k", "tools", "tool_choice",
                         "parallel_tool_calls", "response_format", "chat_template_kwargs"})


def chat_fields(request: BaseModel, chat_template: str | dict | None) -> dict[str, Any]:
    """The chat completion fields of vLLM's Anthropic `request` (a message or a count_tokens request).

    Inline system messages are merged into the leading one when the chat template requires the
    system prompt first, as vLLM's server decides it (and, as it does without a template, when the
    tokenizer has several named templates).
    """
    merge = _requires_leading_system(chat_template if isinstance(chat_template, str) else None)
    chat = AnthropicServingMessages.to_chat_completion_request(request, merge_inline_system=merge)
    return chat.model_dump(include=CHAT_FIELDS, exclude_none=True, by_alias=True)


@cache
def _requires_leading_system(chat_template: str | None) -> bool:
    return AnthropicServingMessages._detect_merge_inline_system(chat_template)


def message_id(completion_id: str) -> str:
    """Anthropic's `msg_` id for the chat completion's `chatcmpl-<id>`."""
    return f"msg_{completion_id.partition('-')[2]}"


def usage(chat_usage: dict[str, int]) -> dict[str, int]:
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"]}


def stop_sequence(stops: Sequence[str], token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> str | None:
    """The stop sequence that ended a choice, if one did: the engine cuts the text where it begins but
    keeps the tokens that wrote it, and stops at the token that completes it. Of those the last token
    completes, the one completed first (then the first listed), as vLLM's detokenizer picks it."""
    if not stops or not token_ids:
        return None
    text = decode(list(token_ids))
    start = len(decode(list(token_ids[:-1])))  # the last token's characters begin here
    ends = [(found + len(stop), order, stop) for order, stop in enumerate(stops)
            if (found := text.find(stop, max(0, start - len(stop) + 1))) != -1]
    return min(ends)[2] if ends else None


def stop_fields(finish_reason: str | None, stop: str | None, tool_used: bool, tool_complete: bool
                ) -> dict[str, str | None]:
    """`stop_reason` and `stop_sequence` of a choice that ended with `finish_reason`, as vLLM maps them:
    max_tokens wins, then complete tool calls, then a stop sequence, then any tool call, else end_turn."""
    reason, sequence = _to_anthropic_stop_reason(finish_reason, stop, tool_used=tool_used, tool_complete=tool_complete)
    return {"stop_reason": reason, "stop_sequence": sequence}


def message(completion: dict, stop: str | None) -> dict:
    """A chat completion (one choice) as Anthropic's message; `stop` is the stop sequence that ended it.

    Its choice's guidance report and the response's resolved guidance go together in `guidance`,
    beside `usage`.
    """
    choice = completion["choices"][0]
    reply = choice["message"]
    calls = reply.get("tool_calls") or []
    content = [{"type": "text", "text": reply["content"]}] if reply.get("content") else []
    content += [{"type": "tool_use", "id": call["id"], "name": call["function"]["name"],
                 "input": json.loads(call["function"]["arguments"])} for call in calls]
    result = {
        "id": message_id(completion["id"]),
        "type": "message",
        "role": "assistant",
        "model": completion["model"],
        "content": content or [{"type": "text", "text": ""}],  # Anthropic's shape of an empty reply
        **stop_fields(choice["finish_reason"], stop, tool_used=bool(calls), tool_complete=bool(calls)),
        "usage": usage(completion["usage"]),
    }
    if "guidance" in choice:
        result["guidance"] = {**choice["guidance"], **completion["guidance"]}
    return result
