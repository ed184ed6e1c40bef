"""Accumulating streamed choice deltas into whole choices, token usage, and what both endpoints'
choices share: their token ids and the names of their logprob tokens."""

from __future__ import annotations

from collections.abc import Sequence

from vllm.entrypoints.generate.base.serving import format_token_id_placeholder

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
    tokens (0 without per-step guidance), with a KL budget the budget and each entry's strength
    over the steered tokens (mean, min, max), and the search's scores when it was searched."""
    result = {"kl": 0.0, "steps": 0} if report is None else {"kl": report.kl, "steps": report.steps}
    if report is not None and report.budget is not None:
        result.update(budget=report.budget.as_dict(), strengths=report.strengths())
    if search is not None:
        result.update(search.as_dict())
    return result


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def with_token_ids(choice: dict, token_ids: Sequence[int], returned: bool | None) -> dict:
    """A choice (or streamed delta) with the ids of the tokens it generated, when `return_token_ids`
    asked for them."""
    return {**choice, "token_ids": list(token_ids)} if returned else choice


def token_name(token_id: int, text: str, as_id: bool | None) -> str:
    """A logprobs entry's token: its text, or with `return_tokens_as_token_ids` vLLM's
    `token_id:<id>` (a token's text alone may not be valid UTF-8, or may not identify it)."""
    return format_token_id_placeholder(token_id) if as_id else text
