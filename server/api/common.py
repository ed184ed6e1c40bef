"""Request fields shared by /v1/completions and /v1/chat/completions."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from guidance.spec import ResolvedGuidance
from server.engine import SamplingOptions
from server.errors import ContextLengthExceeded, InvalidRequest


class StrictModel(BaseModel):
    """Unknown fields are an error (400 naming the field), not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(StrictModel):
    include_usage: bool = False


StopSequences = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]


class SamplingRequest(StrictModel):
    """OpenAI sampling fields, plus vLLM's `top_k` and `ignore_eos` extensions."""

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
    user: str | None = None
    ignore_eos: bool = False
    cache: bool | None = Field(
        default=None, description="false: neither read nor write the response cache for this request."
    )
    guidance: list[dict[str, Any]] | None = Field(
        default=None, description="Per-step guidance entries, e.g. {type: qsharp, model: demo-value, strength: 4}."
    )
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
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_options(
        self, max_tokens: int, logprobs: int | None, guidance: list[ResolvedGuidance] = ()
    ) -> SamplingOptions:
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
        )


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
