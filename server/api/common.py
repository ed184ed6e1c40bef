"""Request fields shared by /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator
import vllm.envs as vllm_envs
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest

from guidance.kl_budget import KLBudget, request_budget
from guidance.params import KLPerToken, MaxKL
from guidance.spec import ResolvedGuidance
from server.api.vllm_fields import (
    IGNORED_FIELDS,
    OUTPUT_FIELDS,
    REQUEST_ID_FIELD,
    SAMPLING_FIELDS,
    VllmRequest,
    engine_params,
    validate_vllm_request,
    vllm_fields,
)
from server.engine import SamplingOptions
from server.errors import ContextLengthExceeded, InvalidRequest


class StrictModel(BaseModel):
    """Unknown fields are an error (400 naming the field), not silently ignored; so are NaN and
    infinite numbers (JSON parsers accept NaN and Infinity)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        """JSON may hold a lone UTF-16 surrogate ("\\ud800"), which is no Unicode text: a tokenizer
        or the response encoder would fail on it, so it is a 400 naming where it was."""
        if (path := lone_surrogate_path(data)) is not None:
            raise InvalidRequest(f"Invalid value for '{path}': the string holds a lone UTF-16 surrogate, "
                                 "which is not Unicode text.", param=path)
        return data


class StreamOptions(StrictModel):
    include_usage: bool = False


# vLLM's own request models take at most VLLM_MAX_STOP_STRINGS (4 by default, OpenAI's limit): the same
# bound here, so that more is refused naming `stop` with the limit, not by vLLM's model with a type error.
StopSequences = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=vllm_envs.VLLM_MAX_STOP_STRINGS)]

# vLLM's sampling and response extensions and its request id, declared as vLLM declares them,
# and the OpenAI fields we ignore.
_VllmSamplingFields = create_model(
    "VllmSamplingFields", __base__=StrictModel,
    **vllm_fields(VllmCompletionRequest, SAMPLING_FIELDS + OUTPUT_FIELDS), **REQUEST_ID_FIELD, **IGNORED_FIELDS,
)


class SamplingRequest(_VllmSamplingFields):
    """OpenAI sampling fields, plus vLLM's extensions (`top_k`, `ignore_eos`, `SAMPLING_FIELDS`,
    `OUTPUT_FIELDS`, `request_id`).

    `vllm_request` is vLLM's request model of the endpoint, which interprets vLLM's fields.
    """

    vllm_request: ClassVar[type[VllmRequest]]


    model: str
    n: int = Field(default=1, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    stop: Annotated[str, Field(min_length=1)] | StopSequences | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    cache: bool | None = Field(
        default=None, description="false: neither read nor write the response cache for this request."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, description="This request's deadline in seconds (default: the server's "
        "--request-timeout-s, at most --max-request-timeout-s); past it: 503 deadline_exceeded.",
    )
    guidance: list[dict[str, Any]] | None = Field(
        default=None, description="Per-step guidance entries, e.g. {type: qsharp, model: demo-value, strength: 4}."
    )
    max_kl: MaxKL = Field(
        default=None,
        description="KL budget of the whole response (nats, at the sampling temperature) for all guidance entries "
                    "together; with an entry's own, the tightest applies. Needs guidance.")
    kl_per_token: KLPerToken = Field(
        default=None,
        description="KL budget of each generated token (nats, at the sampling temperature) for all guidance "
                    "entries together; with an entry's own, the tightest applies. Needs guidance.")
    search: dict[str, Any] | None = Field(
        default=None,
        description="Request-level search, e.g. {type: best_of_n, n: 8, scorer: demo-reward} or "
        "{type: blockwise, candidates: 4, block_tokens: 8, scorer: demo-prefix}.",
    )

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int | None) -> int | None:
        if top_k == 0:
            raise ValueError("top_k must be -1 (disabled) or at least 1")
        return top_k

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, options: StreamOptions | None, info: ValidationInfo):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @property
    def kl_budget(self) -> KLBudget | None:
        """The request's own KL budget over its guidance (None: it gives none)."""
        return request_budget([{"max_kl": self.max_kl, "kl_per_token": self.kl_per_token}])

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_options(
        self, max_tokens: int, logprobs: int | None, guidance: list[ResolvedGuidance] = (),
        vllm_request: VllmRequest | None = None,
    ) -> SamplingOptions:
        """The engine options of this request; vLLM's fields are read through `vllm_request`
        (by default `as_vllm_request()`)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingOptions(
            max_tokens=max_tokens,
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            stop=stop,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            ignore_eos=self.ignore_eos,
            guidance=tuple(g.params.model_dump() for g in guidance),
            engine_params=engine_params(vllm_request or self.as_vllm_request(), max_tokens),
        )

    def as_vllm_request(self) -> VllmRequest:
        """This request as vLLM's own request model of the endpoint reads it (the fields both declare,
        but `n`: each choice is its own engine request here, so greedy requests may ask for several)."""
        names = (self.vllm_request.model_fields.keys() & type(self).model_fields.keys()) - {"n"}
        return validate_vllm_request(self.vllm_request, self.model_dump(include=names, exclude_unset=True, by_alias=True))


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_path(value: Any, path: str = "") -> str | None:
    """The field path of the first string in `value` holding a lone surrogate: the string's own
    path, or for an object key, the object's ("body" at the top), since the key cannot be written."""
    if isinstance(value, str):
        return path if LONE_SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and LONE_SURROGATE.search(key):
            return path or "body"
        inner = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key
        if (found := lone_surrogate_path(item, inner)) is not None:
            return found
    return None


def truncate_prompt(token_ids: list[int], keep: int, max_model_len: int) -> list[int]:
    """vLLM's `truncate_prompt_tokens`: keep the last `keep` tokens (-1: as many as the model takes)."""
    if keep == 0:
        raise InvalidRequest("0 would leave an empty prompt; keep at least 1 token, or -1 for the context length.",
                             param="truncate_prompt_tokens")
    return token_ids[-(max_model_len if keep == -1 else keep):]


def check_n(n: int, max_n: int) -> None:
    if n > max_n:
        raise InvalidRequest(f"n must be at most {max_n}, got {n}.", param="n")


def completion_budget(
    prompt_len: int, max_tokens: int | None, max_model_len: int, *, prompt_param: str, max_tokens_param: str,
    limit: int | None = None,
) -> int:
    """Tokens the completion may use; a prompt that leaves no room is a 400.

    With no `max_tokens` the completion may fill the rest of the context, up to `limit`.
    """
    if prompt_len >= max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {prompt_len} tokens, which leaves no room for a completion.",
            param=prompt_param,
        )
    room = max_model_len - prompt_len
    if max_tokens is None:
        return room if limit is None else min(room, limit)
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the prompt or {max_tokens_param}.",
            param=max_tokens_param,
        )
    return max_tokens
