"""Accumulating streamed choice deltas into whole choices, and token usage."""

from __future__ import annotations

from dataclasses import dataclass, field

from guidance.batch import GuidanceReport
from server.engine import ChoiceDelta, TokenLogprob


@dataclass
class Choice:
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    guidance: GuidanceReport | None = None


class ChoiceCollector:
    """Whole choices built from deltas, keyed by the response's choice index."""

    def __init__(self) -> None:
        self.choices: dict[int, Choice] = {}

    def add(self, index: int, delta: ChoiceDelta) -> None:
        choice = self.choices.setdefault(index, Choice())
        choice.text += delta.text
        choice.num_tokens += len(delta.token_ids)
        choice.logprobs.extend(delta.logprobs or ())
        choice.finish_reason = delta.finish_reason or choice.finish_reason
        choice.guidance = delta.guidance or choice.guidance

    def sorted(self) -> list[tuple[int, Choice]]:
        return sorted(self.choices.items())

    @property
    def completion_tokens(self) -> int:
        return sum(choice.num_tokens for choice in self.choices.values())


def guidance_report(report: GuidanceReport | None) -> dict[str, float | int]:
    """A guided choice's `guidance` object: exact KL(guided || base) summed over its tokens."""
    if report is None:
        return {"kl": 0.0, "steps": 0}
    return {"kl": report.kl, "steps": report.steps}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
