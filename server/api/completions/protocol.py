"""Request body of POST /v1/completions (OpenAI legacy completions)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from server.api.common import SamplingRequest

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]

Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | TokenIds
    | Annotated[list[TokenIds], Field(min_length=1)]
)


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    # The OpenAI default for this endpoint.
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a single prompt is a batch of one."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)
