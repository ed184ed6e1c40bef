"""The request fields we take from vLLM's OpenAI server, defined and interpreted by vLLM itself.

Each field named here is declared on our request models with the type, bounds and default of
vLLM's own request model (no second copy), and vLLM's own request model turns a request's
fields into engine `SamplingParams` (`to_sampling_params`), so a field means here exactly what
it means to `vllm serve`: `response_format` becomes a structured-output grammar, `echo` asks for
the prompt's logprobs, `logit_bias` and `bad_words` are checked as vLLM checks them.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, Field, ValidationError
from pydantic.fields import FieldInfo
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import SamplingParams

from server.errors import InvalidRequest, vllm_client_error

VllmRequest = VllmCompletionRequest | VllmChatRequest
M = TypeVar("M", bound=BaseModel)
_DEFAULTS = SamplingParams()  # what a request that sets none of ENGINE_PARAMS gets

# Sampling fields of both endpoints, beyond the OpenAI ones our models declare themselves.
SAMPLING_FIELDS = (
    "min_p", "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "bad_words",
    "allowed_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "prompt_logprobs", "truncate_prompt_tokens", "response_format", "structured_outputs",
)
# Response fields of both endpoints: token ids beside the text, logprob tokens named by their ids.
OUTPUT_FIELDS = ("return_token_ids", "return_tokens_as_token_ids")
# Prompt fields of /v1/completions.
COMPLETION_FIELDS = ("add_special_tokens",)
# Chat-template and tool fields of /v1/chat/completions.
CHAT_FIELDS = (
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents",
    "tools", "tool_choice", "parallel_tool_calls",
)
# `SamplingParams` attributes that vLLM derives from the fields above; the engine passes them on
# unchanged (our own fields: temperature, top_p, top_k, stop, seed, penalties, logprobs, ignore_eos).
ENGINE_PARAMS = (
    "min_p", "repetition_penalty", "logit_bias", "min_tokens", "stop_token_ids", "bad_words",
    "allowed_token_ids", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "prompt_logprobs", "structured_outputs",
)

# OpenAI fields that do not change the output: accepted and ignored, as vLLM's server does.
IGNORED_FIELDS: dict[str, Any] = {
    "user": (str | None, Field(default=None, description="Ignored (an end-user id for the caller's records).")),
    "metadata": (dict[str, str] | None, Field(default=None, description="Ignored (OpenAI stored-completion tags).")),
    "store": (bool | None, Field(default=None, description="Ignored: this server stores no completions.")),
    "service_tier": (str | None, Field(default=None, description="Ignored: one tier.")),
    "safety_identifier": (str | None, Field(default=None, description="Ignored.")),
    "prompt_cache_key": (str | None, Field(default=None, description="Ignored: vLLM caches prefixes itself.")),
}

# The client's name for a request, as vLLM declares it (random when not sent). It is left out of
# the request's dump: it changes no output, so the response cache's key must not hold it.
REQUEST_ID_FIELD: dict[str, Any] = {"request_id": (str, FieldInfo.merge_field_infos(
    VllmCompletionRequest.model_fields["request_id"], exclude=True,
    description="The base of the response's id (`cmpl-<request_id>`, `chatcmpl-<request_id>`); an X-Request-Id "
                "header takes precedence. Random when neither is sent."))}


def vllm_fields(model: type[BaseModel], names: tuple[str, ...]) -> dict[str, Any]:
    """`create_model` field definitions of `names`, exactly as `model` declares them."""
    return {name: (model.model_fields[name].annotation, model.model_fields[name]) for name in names}


def validate_vllm_request(vllm_model: type[M], fields: dict[str, Any]) -> M:
    """vLLM's own request model of a request's `fields`; what vLLM refuses is a 400 naming the field."""
    try:
        return vllm_model.model_validate(fields)
    except VLLMClientError as exc:  # vLLM's whole-request checks raise it directly, naming the field
        raise vllm_client_error(exc) from exc
    except ValidationError as exc:
        error = exc.errors()[0]
        cause = error.get("ctx", {}).get("error")  # a whole-request check names its field itself
        param = getattr(cause, "parameter", None) or ".".join(str(part) for part in error["loc"]) or None
        message = str(cause) if cause is not None else error["msg"]
        raise InvalidRequest(message, param=param) from exc


def engine_params(request: VllmRequest, max_tokens: int) -> dict[str, Any]:
    """The `ENGINE_PARAMS` vLLM derives from `request`, those that differ from vLLM's defaults.

    Values `SamplingParams` refuses (a logit bias out of range, ...) are a 400 naming the field.
    """
    try:
        params = request.to_sampling_params(max_tokens, {})
    except (ValueError, VLLMClientError) as exc:  # VLLMValidationError names its parameter
        raise vllm_client_error(exc) from exc
    return {name: value for name in ENGINE_PARAMS
            if (value := getattr(params, name)) != getattr(_DEFAULTS, name)}
