"""A Responses request as a chat completion request, and a chat completion as a response object.

The conversation is built by vLLM's own code (`construct_input_messages`: the instructions, then the
previous response's conversation without its system messages and its output, then the input), so a
response is prompted exactly as on vLLM's server; the response object is vLLM's
(`ResponsesResponse.from_request`), its output message as vLLM builds it without a parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from openai.types.responses import ResponseOutputMessage, ResponseOutputText
from openai.types.responses.response_output_text import Logprob, LogprobTopLogprob
from vllm.entrypoints.openai.responses.protocol import (
    InputTokensDetails,
    OutputTokensDetails,
    ResponsesResponse,
    ResponseUsage,
)
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest as VllmResponsesRequest
from vllm.entrypoints.openai.responses.utils import construct_input_messages, should_continue_final_message
from vllm.utils import random_uuid

from server.api.responses.protocol import EXTENSION_FIELDS, ResponsesRequest
from server.api.responses.store import StoredResponse

# Sampling and template fields with the same name and meaning on chat.
SHARED_FIELDS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "ignore_eos", "skip_special_tokens",
    "include_stop_str_in_output", "chat_template_kwargs", *EXTENSION_FIELDS,
})
# Chat fields an error may name, by the Responses field the client set (a message's index on chat
# counts the instructions and the previous conversation too, so it names `input` as a whole).
_RESPONSES_PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens",
                     "max_tokens": "max_output_tokens", "logprobs": "include", "top_logprobs": "top_logprobs"}
_ROOT = re.compile(r"[A-Za-z_]+")


def responses_param(chat_param: str | None) -> str | None:
    """The Responses field a chat completion field named in an error came from."""
    if chat_param is None or (root := _ROOT.match(chat_param)) is None:
        return chat_param
    return _RESPONSES_PARAMS.get(root.group(), chat_param)


def conversation(request: VllmResponsesRequest, previous: StoredResponse | None) -> list[dict[str, Any]]:
    """The messages a response is prompted with, as vLLM builds them."""
    return construct_input_messages(
        request_instructions=request.instructions,
        request_input=request.input,
        prev_msg=previous.conversation if previous is not None else None,
        prev_response_output=[ResponseOutputMessage.model_validate(item) for item in previous.response["output"]]
        if previous is not None else None,
    )


def chat_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message of the conversation as the chat path reads it: its text parts (`input_text`,
    `output_text`) as chat's text parts."""
    content = message.get("content")
    if isinstance(content, list):
        content = [{"type": "text", "text": part["text"]} for part in content]
    return {"role": message["role"], "content": content}


def chat_fields(body: ResponsesRequest, request: VllmResponsesRequest, messages: list[dict[str, Any]],
                model: str) -> dict[str, Any]:
    """The chat completion request of a response: its conversation, sampling and our own fields."""
    continue_final = should_continue_final_message(request.input)
    fields = body.model_dump(include=SHARED_FIELDS, exclude_unset=True)
    fields.update(model=model, messages=[chat_message(m) for m in messages],
                  add_generation_prompt=not continue_final, continue_final_message=continue_final)
    if body.max_output_tokens is not None:
        fields["max_completion_tokens"] = body.max_output_tokens
    if (structured := request.extract_structured_outputs()) is not None:  # text.format, as vLLM reads it
        fields["structured_outputs"] = structured
    if body.wants_logprobs:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs)
    if body.stream:
        fields.update(stream=True, stream_options={"include_usage": True})
    return fields


def logprobs(chat_logprobs: dict | None) -> list[Logprob] | None:
    """Chat's logprobs object (whole or a delta's) as an output_text's logprobs."""
    if chat_logprobs is None:
        return None
    return [Logprob(token=entry["token"], logprob=entry["logprob"], bytes=entry["bytes"],
                    top_logprobs=[LogprobTopLogprob(**top) for top in entry["top_logprobs"]])
            for entry in chat_logprobs["content"]]


def output_message(text: str, text_logprobs: list[Logprob] | None) -> ResponseOutputMessage:
    """The output message of a reply, as vLLM builds it without a parser (no content for no text)."""
    content = [ResponseOutputText(type="output_text", text=text, annotations=[], logprobs=text_logprobs)]
    return ResponseOutputMessage(id=f"msg_{random_uuid()}", type="message", role="assistant",
                                 content=content if text else [], status="completed")


def usage(chat_usage: dict[str, int]) -> ResponseUsage:
    """vLLM's usage of a one-turn response. Cached tokens are 0: the chat path does not read vLLM's
    prefix-cache hits."""
    input_tokens, output_tokens = chat_usage["prompt_tokens"], chat_usage["completion_tokens"]
    return ResponseUsage(input_tokens=input_tokens, output_tokens=output_tokens,
                         total_tokens=input_tokens + output_tokens,
                         input_tokens_details=InputTokensDetails(cached_tokens=0, cache_write_tokens=0),
                         output_tokens_details=OutputTokensDetails())


@dataclass
class Turn:
    """One response in the making: vLLM's request of it (named with the response's id), the
    conversation it is prompted with, and its token budget once the chat path has set it."""

    request: VllmResponsesRequest
    conversation: list[dict[str, Any]]
    model: str
    created: int
    max_tokens: int = 0

    @property
    def id(self) -> str:
        return self.request.request_id

    def response(self, output: list[ResponseOutputMessage], finish_reason: str | None,
                 chat_usage: dict[str, int] | None = None, guidance: dict | None = None) -> ResponsesResponse:
        """The response object, as vLLM's server makes it: `in_progress` before a finish reason,
        `incomplete` when the token budget ran out, else `completed`; with `guidance` beside `usage`."""
        status = "in_progress" if finish_reason is None else "incomplete" if finish_reason == "length" else "completed"
        response = ResponsesResponse.from_request(
            self.request, self.request.to_sampling_params(self.max_tokens, {}), model_name=self.model,
            created_time=self.created, output=output, status=status,
            usage=usage(chat_usage) if chat_usage is not None else None)
        if guidance is not None:
            response.guidance = guidance  # an extra field: vLLM's response model allows them
        return response


def completion_response(turn: Turn, completion: dict) -> ResponsesResponse:
    """A chat completion (one choice) as the response object; its choice's guidance report and the
    request's resolved guidance go together in `guidance`."""
    choice = completion["choices"][0]
    output = [output_message(choice["message"]["content"] or "", logprobs(choice["logprobs"]))]
    guidance = {**choice["guidance"], **completion["guidance"]} if "guidance" in choice else None
    return turn.response(output, choice["finish_reason"], completion["usage"], guidance)
