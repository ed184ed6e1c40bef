"""The search runner over a scripted engine: which engine requests it makes, what it keeps, how it fails."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from guidance.batch import GuidanceReport
from guidance.search.scorers import Completion, Scorer, ScorerCatalog
from guidance.search.spec import BestOfN, Blockwise
from server.engine import ChoiceDelta, SamplingOptions
from server.search import Search
from server.streams import merge


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions


class ScriptedEngine:
    """Child i of a call writes tokens derived from its seed; a child may fail or stop early."""

    def __init__(self, stop_after: int | None = None, fail_child: int | None = None) -> None:
        self.calls: list[Call] = []
        self.closed: list[str] = []
        self.stop_after, self.fail_child = stop_after, fail_child

    def generate(self, request_id, prompt_ids, options):
        self.calls.append(Call(request_id, list(prompt_ids), options))
        return merge([self._child(f"{request_id}-{i}", i, len(prompt_ids), options) for i in range(options.n)])

    async def _child(self, engine_id, index, prompt_len, options):
        try:
            seed = options.seed + index
            for t in range(options.max_tokens):
                await asyncio.sleep(0)
                if index == self.fail_child and t == 1:
                    raise RuntimeError("engine core died")
                stop = self.stop_after is not None and prompt_len + t + 1 >= self.stop_after
                last = t == options.max_tokens - 1 or stop
                yield ChoiceDelta(index=index, text=str(seed % 10), token_ids=(seed,), logprobs=None,
                                  finish_reason=("stop" if stop else "length") if last else None,
                                  guidance=GuidanceReport(kl=0.5, steps=t + 1) if last and options.guidance else None)
                if last:
                    return
        finally:
            self.closed.append(engine_id)


class DigitScorer(Scorer):
    """Scores a completion by its last digit: candidate seed s scores s % 10."""

    name, kind = "digits", "verifier"

    def __init__(self) -> None:
        self.calls: list[list[Completion]] = []

    def score(self, prompt_text, prompt_ids, completions):
        self.calls.append(list(completions))
        return [float(c.text[-1]) for c in completions]


def run(search: Search, *args) -> list[ChoiceDelta]:
    async def collect():
        return [delta async for delta in search.generate("r", *args)]

    return asyncio.run(collect())


def test_best_of_n_submits_every_candidate_at_once_and_keeps_the_best():
    engine, scorer = ScriptedEngine(), DigitScorer()
    options = SamplingOptions(max_tokens=2, n=2, seed=10)
    deltas = run(Search(engine, ScorerCatalog([scorer])), [1, 2], "p", options, BestOfN(type="best_of_n", n=3,
                                                                                         scorer="digits"))
    [call] = engine.calls
    assert (call.options.n, call.options.seed, call.prompt_ids) == (6, 10, [1, 2])  # 2 picks x 3, one prompt
    by_pick = {d.index: d for d in deltas}
    assert len(deltas) == 2 and sorted(by_pick) == [0, 1]
    # Pick j holds candidates with seeds 10 + 3j + c; digit scores keep the last.
    assert by_pick[0].search.candidate_scores == (0.0, 1.0, 2.0) and by_pick[0].search.selected == 2
    assert by_pick[1].search.candidate_scores == (3.0, 4.0, 5.0) and by_pick[1].search.selected == 2
    assert by_pick[1].token_ids == (15, 15) and by_pick[1].text == "55" and by_pick[1].finish_reason == "length"
    assert [len(c) for c in scorer.calls] == [3, 3]  # one scoring call per pick


def test_blockwise_grows_the_prefix_with_each_kept_block():
    engine, scorer = ScriptedEngine(), DigitScorer()
    options = SamplingOptions(max_tokens=5, n=1, seed=0, guidance=({"type": "cd"},))
    deltas = run(Search(engine, ScorerCatalog([scorer])), [7], "p", options,
                 Blockwise(type="blockwise", candidates=2, block_tokens=2, scorer="digits"))
    # ceil(5 / 2) = 3 rounds of 2 candidates: 2, 2, then the 1 token left.
    assert [c.options.max_tokens for c in engine.calls] == [2, 2, 1]
    assert [c.options.seed for c in engine.calls] == [0, 2, 4]  # distinct seeds per round
    kept = [1, 3]  # the better candidate of rounds 0 and 1 (seeds 1 and 3)
    assert engine.calls[1].prompt_ids == [7, kept[0], kept[0]]
    assert engine.calls[2].prompt_ids == [7, kept[0], kept[0], kept[1], kept[1]]
    assert [d.text for d in deltas] == ["11", "33", "5"]
    assert [d.finish_reason for d in deltas] == [None, None, "length"]
    final = deltas[-1]
    assert final.search.candidate_scores == ((0.0, 1.0), (2.0, 3.0), (4.0, 5.0)) and final.search.selected == (1, 1, 1)
    assert final.guidance == GuidanceReport(kl=1.5, steps=5)  # summed over the kept blocks
    # Each block is scored as everything kept so far plus the candidate.
    assert [c.text for c in scorer.calls[1]] == ["1122", "1133"]


def test_blockwise_ends_when_the_kept_block_stops():
    engine = ScriptedEngine(stop_after=4)  # EOS once prompt + completion reach 4 tokens
    deltas = run(Search(engine, ScorerCatalog([DigitScorer()])), [7], "p", SamplingOptions(max_tokens=10, seed=0),
                 Blockwise(type="blockwise", candidates=2, block_tokens=2, scorer="digits"))
    assert len(engine.calls) == 2 and [d.finish_reason for d in deltas] == [None, "stop"]
    assert deltas[-1].search is not None


def test_an_engine_error_in_one_candidate_fails_the_choice_and_closes_the_others():
    engine = ScriptedEngine(fail_child=1)
    with pytest.raises(RuntimeError, match="engine core died"):
        run(Search(engine, ScorerCatalog([DigitScorer()])), [1], "p", SamplingOptions(max_tokens=4, n=1, seed=0),
            BestOfN(type="best_of_n", n=3, scorer="digits"))
    assert sorted(engine.closed) == ["r-0", "r-1", "r-2"]
