"""Accumulating streamed choice deltas into whole choices, and token usage."""

from __future__ import annotations

from guidance.batch import GuidanceReport
from guidance.search.report import SearchReport
from server.engine import ChoiceDelta, ChoiceOutput


class ChoiceCollector:
    """Whole choices built from deltas, keyed by the response's choice index."""

    def __init__(self) -> None:
        self.choices: dict[int, ChoiceOutput] = {}

    def add(self, index: int, delta: ChoiceDelta) -> None:
        self.choices.setdefault(index, ChoiceOutput()).add(delta)

    def sorted(self) -> list[tuple[int, ChoiceOutput]]:
        return sorted(self.choices.items())

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices.values())


def guidance_report(report: GuidanceReport | None, search: SearchReport | None = None) -> dict:
    """A guided or searched choice's `guidance` object: exact KL(guided || base) summed over its
    tokens (0 without per-step guidance), and the search's scores when it was searched."""
    result = {"kl": 0.0, "steps": 0} if report is None else {"kl": report.kl, "steps": report.steps}
    if search is not None:
        result.update(search.as_dict())
    return result


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
