"""One evaluated sample: what came back for one (configuration, prompt, sample index)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    prompt_id: str
    sample: int  # j in 0..K-1
    seed: int  # the request's seed
    text: str  # the completion (the kept one, for a search)
    reward: float  # the verifier's
    answer: Hashable | None  # the verifier's answer extractor's (None: no answer, or no extractor)
    kl: float  # the response's guidance.kl (0 without per-step guidance)
    steps: int  # the response's guidance.steps
    completion_tokens: int  # the response's usage.completion_tokens
    score: float | None = None  # a search's score of the kept completion
    generated_tokens: int | None = None  # every candidate's tokens for a search (its report), else the completion's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
