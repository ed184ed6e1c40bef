"""Request body of POST /v1/completions (OpenAI legacy completions)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, ValidationInfo, create_model, field_validator
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest

from server.api.common import SamplingRequest
from server.api.vllm_fields import COMPLETION_FIELDS, vllm_fields

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]

Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


# vLLM's prompt fields of this endpoint, declared as vLLM declares them.
_VllmCompletionFields = create_model(
    "VllmCompletionFields", __base__=SamplingRequest, **vllm_fields(VllmCompletionRequest, COMPLETION_FIELDS))


class CompletionRequest(_VllmCompletionFields):
    vllm_request = VllmCompletionRequest

    prompt: Prompt
    echo: bool = False
    # The OpenAI default for this endpoint; 0 (with echo) scores the prompt without generating.
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("max_tokens")
    @classmethod
    def _zero_tokens_need_echo(cls, max_tokens: int | None, info: ValidationInfo) -> int | None:
        if max_tokens == 0 and not info.data.get("echo"):
            raise ValueError("0 generates nothing; it is only allowed with echo (to score the prompt)")
        return max_tokens

    @property
    def echoes_text(self) -> bool:
        """Whether a choice's text starts with its prompt's: with `echo`, unless `return_token_ids`
        returns the prompt's token ids instead (vLLM's server then leaves the prompt's text out)."""
        return self.echo and not self.return_token_ids

    @property
    def scores_prompt_only(self) -> bool:
        """`max_tokens: 0` with `echo`: the prompt and its logprobs, nothing generated."""
        return self.max_tokens == 0

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a single prompt is a batch of one."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)
