"""The search runner over a scripted engine: which engine requests it makes, what it keeps, how it fails."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from guidance.batch import GuidanceReport
from guidance.search.scorers import Completion, Scorer, ScorerCatalog
from guidance.search.report import Checkpoint
from guidance.search.spec import BestOfN, Blockwise, Prune
from server.engine import ChoiceDelta, SamplingOptions
from server.search import Search
from server.streams import merge


@dataclass
class Call:
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions


class ScriptedEngine:
    """Child i of a call writes tokens derived from its seed (one per `token_seconds`); a child may
    fail, stop early, or be aborted."""

    def __init__(self, stop_after: int | None = None, fail_child: int | None = None,
                 token_seconds: float = 0.0) -> None:
        self.calls: list[Call] = []
        self.closed: list[str] = []
        self.aborted: list[str] = []
        self.stop_after, self.fail_child, self.token_seconds = stop_after, fail_child, token_seconds

    async def abort(self, request_id, index):
        self.aborted.append(f"{request_id}-{index}")

    def generate(self, request_id, prompt_ids, options):
        self.calls.append(Call(request_id, list(prompt_ids), options))
        return merge([self._child(f"{request_id}-{i}", i, len(prompt_ids), options) for i in range(options.n)])

    async def _child(self, engine_id, index, prompt_len, options):
        try:
            seed = options.seed + index
            for t in range(options.max_tokens):
                await asyncio.sleep(self.token_seconds)
                if engine_id in self.aborted:
                    yield ChoiceDelta(index=index, text="", token_ids=(), logprobs=None, finish_reason="abort")
                    return
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

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        self.calls.append(list(completions))
        return [float(c.text[-1]) for c in completions]


def searcher(engine: ScriptedEngine, *scorers: Scorer) -> Search:
    return Search(engine, ScorerCatalog(scorers), lambda ids: "".join(str(t % 10) for t in ids))


def run(search: Search, *args) -> list[ChoiceDelta]:
    async def collect():
        return [delta async for delta in search.generate("r", *args)]

    return asyncio.run(collect())


def test_best_of_n_submits_every_candidate_at_once_and_keeps_the_best():
    engine, scorer = ScriptedEngine(), DigitScorer()
    options = SamplingOptions(max_tokens=2, n=2, seed=10)
    deltas = run(searcher(engine, scorer), [1, 2], "p", options, BestOfN(type="best_of_n", n=3,
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
    deltas = run(searcher(engine, scorer), [7], "p", options,
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
    deltas = run(searcher(engine, DigitScorer()), [7], "p", SamplingOptions(max_tokens=10, seed=0),
                 Blockwise(type="blockwise", candidates=2, block_tokens=2, scorer="digits"))
    assert len(engine.calls) == 2 and [d.finish_reason for d in deltas] == [None, "stop"]
    assert deltas[-1].search is not None


def test_an_engine_error_in_one_candidate_fails_the_choice_and_closes_the_others():
    engine = ScriptedEngine(fail_child=1)
    with pytest.raises(RuntimeError, match="engine core died"):
        run(searcher(engine, DigitScorer()), [1], "p", SamplingOptions(max_tokens=4, n=1, seed=0),
            BestOfN(type="best_of_n", n=3, scorer="digits"))
    assert sorted(engine.closed) == ["r-0", "r-1", "r-2"]


def test_pruned_best_of_n_aborts_exactly_the_lowest_scored_candidates():
    """8 candidates scored 0..7 (seeds 0..7): at 4 tokens half of the 8 live go (0-3), at 8 tokens
    half of the 4 (4, 5), then min_keep=2 stops the checkpoints; the best unpruned is kept."""
    engine, scorer = ScriptedEngine(token_seconds=0.002), DigitScorer()
    search = BestOfN(type="best_of_n", n=8, scorer="digits",
                     prune=Prune(scorer="digits", every=4, fraction=0.5, min_keep=2))
    [delta] = run(searcher(engine, scorer), [1], "p", SamplingOptions(max_tokens=400, n=1, seed=0), search)
    assert engine.aborted == [f"r-{c}" for c in range(6)]
    report = delta.search
    assert report.checkpoints == (
        Checkpoint(tokens=4, scored=tuple(range(8)), scores=tuple(map(float, range(8))), pruned=(0, 1, 2, 3)),
        Checkpoint(tokens=8, scored=(4, 5, 6, 7), scores=(4.0, 5.0, 6.0, 7.0), pruned=(4, 5)))
    # Checkpoints score exactly `tokens` tokens of each live candidate; the final scorer sees the unpruned two.
    assert [[len(c.token_ids) for c in call] for call in scorer.calls[:2]] == [[4] * 8, [8] * 4]
    assert [c.text for c in scorer.calls[0]] == [str(c) * 4 for c in range(8)]
    assert [len(c.token_ids) for c in scorer.calls[2]] == [400, 400]
    assert report.candidate_scores == (None,) * 6 + (6.0, 7.0) and report.selected == 7
    assert delta.token_ids == (7,) * 400
    # The pruned candidates stopped early: far fewer than 8 x 400 tokens were generated.
    assert 2 * 400 + 6 * 4 <= report.generated_tokens < 2 * 400 + 6 * 400
    assert report.as_dict()["checkpoints"][1] == {"tokens": 8, "scored": [4, 5, 6, 7],
                                                  "scores": [4.0, 5.0, 6.0, 7.0], "pruned": [4, 5]}


def test_prune_absent_or_never_firing_is_plain_best_of_n():
    results = []
    for prune in (None, Prune(scorer="digits", every=2, fraction=0.1)):  # floor(4 x 0.1) = 0: nothing to prune
        engine, scorer = ScriptedEngine(), DigitScorer()
        search = BestOfN(type="best_of_n", n=4, scorer="digits", prune=prune)
        deltas = run(searcher(engine, scorer), [1], "p", SamplingOptions(max_tokens=6, n=2, seed=3), search)
        assert engine.aborted == [] and len(scorer.calls) == 2  # the final scoring of each pick only
        results.append(deltas)
    plain, never = results
    assert [d.search.checkpoints for d in plain] == [None, None]
    assert "checkpoints" not in plain[0].search.as_dict()
    assert [d.search.checkpoints for d in never] == [(), ()]
    strip = [(d.index, d.token_ids, d.search.candidate_scores, d.search.selected, d.search.generated_tokens)
             for d in plain]
    assert strip == [(d.index, d.token_ids, d.search.candidate_scores, d.search.selected, d.search.generated_tokens)
                     for d in never]
    assert [d.search.generated_tokens for d in plain] == [4 * 6, 4 * 6]
