"""Step-level search (beam, DVTS, particle filtering) over a scripted engine, checked step by step against
hand-computed traces; its pure parts on hand-made numbers; its spec's errors."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from guidance.errors import GuidanceError
from guidance.search.aggregate import aggregate
from guidance.search.scorers import Completion, Scorer, ScorerCatalog
from guidance.search.spec import DVTS, Beam, ParticleFilter, SearchLimits, parse_search
from guidance.search.steps import particle_weights, resample, shared_steps, step_end, top_k, weighted_majority
from server.engine import ChoiceDelta, SamplingOptions
from server.search import Search
from server.streams import merge

NL = 10  # token 10 is "\n": a step ends at two of them, split across tokens
EOS = 11  # the scripted end of sequence


def decode(ids) -> str:
    return "".join("\n" if t == NL else "" if t == EOS else str(t % 10) for t in ids)


class StepEngine:
    """Child c of a call writes, for seed s = options.seed + c: the digit s % 10, "\\n", "\\n", then a
    digit it should never get to write (the runner aborts it at the delimiter). Once the prompt holds
    `steps` steps it writes s % 10 and ends the sequence instead. It ignores stop strings, as a scripted
    engine may: the runner must find the delimiter itself."""

    def __init__(self, steps: int, prompt_len: int = 1) -> None:
        self.steps, self.prompt_len = steps, prompt_len
        self.calls: list[tuple[str, list[int], SamplingOptions]] = []
        self.aborted: list[str] = []
        self.closed: list[str] = []

    async def abort(self, request_id, index):
        self.aborted.append(f"{request_id}-{index}")

    def generate(self, request_id, prompt_ids, options):
        self.calls.append((request_id, list(prompt_ids), options))
        return merge([self._child(f"{request_id}-{c}", c, prompt_ids, options) for c in range(options.n)])

    async def _child(self, engine_id, index, prompt_ids, options):
        seed = options.seed + index
        done = decode(prompt_ids[self.prompt_len:]).count("\n\n") >= self.steps
        script = [seed % 10, EOS] if done else [seed % 10, NL, NL, 9]
        try:
            for t, token in enumerate(script[:options.max_tokens]):
                await asyncio.sleep(0)
                if engine_id in self.aborted:
                    yield ChoiceDelta(index=index, text="", token_ids=(), logprobs=None, finish_reason="abort")
                    return
                last = t == len(script) - 1 or t == options.max_tokens - 1
                finish = ("stop" if token == EOS else "length") if last else None
                yield ChoiceDelta(index=index, text=decode([token]), token_ids=(token,), logprobs=None,
                                  finish_reason=finish)
        finally:
            self.closed.append(engine_id)


class StepDigits(Scorer):
    """A process reward model in miniature: a step's score is its digit / 10 (a finished step too)."""

    name, kind = "prm", "prm"

    def __init__(self) -> None:
        self.calls: list[list[tuple[Completion, ...]]] = []

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        raise AssertionError("step-level search scores steps")

    def score_steps(self, prompt_text, prompt_ids, completions, reference=None):
        self.calls.append(list(completions))
        return [[int(step.text[0]) / 10 for step in steps] for steps in completions]


def run(engine, search, options, scorer=None):
    searcher = Search(engine, ScorerCatalog([scorer or StepDigits()]), decode)

    async def collect():
        return [delta async for delta in searcher.generate("r", [0], "p", options, search)]

    return asyncio.run(collect())


def beam(**fields):
    return Beam(type="beam", scorer="prm", **{"beam_width": 2, "expansions": 2, **fields})


def test_beam_keeps_exactly_the_top_beam_width_each_step():
    """max_steps 4, 2 beams x 2 expansions, request seed 0: a round's expansion i, child c has seed
    (round * 4 + i * 2) + c (4: the most candidates a round has), and scores its digit / 10.

    round 0: root -> seeds 0, 1 -> scores .0 .1; keep both (best first: "1", "0").
    round 1: "1" -> 4, 5; "0" -> 6, 7: scores .4 .5 .6 .7; keep 7 and 6 ("0"'s children).
    round 2: "0|7" -> 8, 9; "0|6" -> 10, 11 (digits 0, 1): keep 9 and 8.
    round 3 (the prompt holds 3 steps: each expansion ends the sequence): "0|7|9" -> 12, 13; "0|7|8" ->
    14, 15 (digits 2..5): keep 15 and 14, both finished; the answer is the best, "0|7|8|5".
    """
    engine = StepEngine(steps=3)
    deltas = run(engine, beam(max_steps=4), SamplingOptions(max_tokens=100, seed=0))
    assert [opts.seed for _, _, opts in engine.calls] == [0, 4, 6, 8, 10, 12, 14]
    report = deltas[-1].search
    assert [r.kept for r in report.rounds] == [(0, 1), (2, 3), (0, 1), (2, 3)]
    assert [r.scores for r in report.rounds] == [
        (0.0, 0.1), (0.4, 0.5, 0.6, 0.7), (0.8, 0.9, 0.0, 0.1), (0.2, 0.3, 0.4, 0.5)]
    final = deltas[-1]
    assert final.finish_reason == "stop"
    assert "".join(d.text for d in deltas) == "0\n\n7\n\n8\n\n5"
    assert report.finished_scores == (0.5, 0.4) and report.selected == 0 and report.score == 0.5
    # The delimiter split across two tokens was found; the token after it was never kept.
    assert [t for d in deltas for t in d.token_ids] == [0, NL, NL, 7, NL, NL, 8, NL, NL, 5, EOS]
    assert report.kept_tokens == 11
    # Each delimited expansion was stopped at its delimiter (the engine ignored the stop string).
    assert len(engine.aborted) == 2 + 4 + 4
    # Every token received counts, the ones past a delimiter that arrived before the abort too.
    assert 3 * (2 + 4 + 4) + 2 * 4 <= report.generated_tokens <= 4 * (2 + 4 + 4) + 2 * 4
    # Prompts grow by the kept steps only: round 2 expands "0|7" (the best) first.
    assert engine.calls[3][1] == [0, 0, NL, NL, 7, NL, NL]


def test_beam_streams_the_steps_every_surviving_solution_shares_as_soon_as_they_are_decided():
    deltas = run(StepEngine(steps=3), beam(max_steps=4), SamplingOptions(max_tokens=100, seed=0))
    # After round 1 both beams descend from "0": decided. After round 2 both from "0|7". Then the answer.
    assert [d.text for d in deltas] == ["0\n\n", "7\n\n", "8\n\n5"]
    assert [d.finish_reason for d in deltas] == [None, None, "stop"]
    assert [d.search is None for d in deltas] == [True, True, False]


def test_dvts_subtrees_never_share_a_branch_after_their_root():
    """n 4, beam_width 2: two subtrees, each keeping the better of its own 2 expansions per step."""
    engine = StepEngine(steps=2)
    deltas = run(engine, DVTS(type="dvts", n=4, beam_width=2, scorer="prm", max_steps=3),
                 SamplingOptions(max_tokens=100, seed=0))
    report = deltas[-1].search
    # Round 0: subtree 0 (seeds 0, 1), subtree 1 (seeds 2, 3): each keeps its better one.
    assert report.rounds[0].scores == (0.0, 0.1, 0.2, 0.3) and report.rounds[0].kept == (1, 3)
    prompts = [prompt for request_id, prompt, _ in engine.calls if "-s1-" in request_id]
    assert prompts == [[0, 1, NL, NL], [0, 3, NL, NL]]  # each subtree grows its own solution only
    prompts = [prompt for request_id, prompt, _ in engine.calls if "-s2-" in request_id]
    assert [p[:4] for p in prompts] == [[0, 1, NL, NL], [0, 3, NL, NL]]
    assert len(report.finished_scores) == 2  # one answer per subtree
    assert deltas[0].finish_reason == "stop" and len(deltas) == 1  # no step is shared: all sent at the end


def test_particle_filtering_is_reproducible_with_a_seed_and_resamples_by_weight():
    search = ParticleFilter(type="particle_filter", particles=4, scorer="prm", max_steps=3)
    first = run(StepEngine(steps=2), search, SamplingOptions(max_tokens=100, seed=5))
    again = run(StepEngine(steps=2), search, SamplingOptions(max_tokens=100, seed=5))
    assert [r.kept for r in first[-1].search.rounds] == [r.kept for r in again[-1].search.rounds]
    assert "".join(d.text for d in first) == "".join(d.text for d in again)
    report = first[-1].search
    assert [len(r.kept) for r in report.rounds] == [4, 4, 4]
    # Round 0: seeds 5..8 score .5 .6 .7 .8; a draw follows softmax(logit(score)).
    assert report.rounds[0].scores == (0.5, 0.6, 0.7, 0.8)
    generator = torch.Generator().manual_seed(0)
    weights = particle_weights([0.5, 0.6, 0.7, 0.8], 1.0)
    counts = torch.bincount(torch.tensor(resample(weights, 20000, generator)), minlength=4) / 20000
    assert torch.allclose(counts, weights.float(), atol=0.01)


def test_particle_weights_are_the_softmax_of_the_logit_over_the_temperature():
    weights = particle_weights([0.5, 0.9], 2.0)
    expected = torch.softmax(torch.tensor([0.0, math.log(9.0) / 2.0], dtype=torch.float64), dim=0)
    assert torch.allclose(weights, expected)
    assert torch.allclose(particle_weights([1.0, 0.0], 1.0).sum(), torch.tensor(1.0, dtype=torch.float64))
    assert torch.allclose(particle_weights([3.0, 1.0], 1.0, "score"),
                          torch.softmax(torch.tensor([3.0, 1.0], dtype=torch.float64), dim=0))


def test_a_client_that_leaves_aborts_every_branch():
    engine = StepEngine(steps=50)
    searcher = Search(engine, ScorerCatalog([StepDigits()]), decode)

    async def leave_after_the_first_delta():
        stream = searcher.generate("r", [0], "p", SamplingOptions(max_tokens=1000, seed=0),
                                   beam(beam_width=1, expansions=3, max_steps=50))
        first = await anext(stream)
        await stream.aclose()
        return first

    first = asyncio.run(leave_after_the_first_delta())
    assert first.text == "2\n\n"
    started = {f"{request_id}-{c}" for request_id, _, opts in engine.calls for c in range(opts.n)}
    assert set(engine.closed) == started  # every branch's stream was closed, none left running
    assert len(engine.calls) < 50


def test_fixed_size_steps_and_the_step_cap():
    engine = StepEngine(steps=5)
    deltas = run(engine, beam(step_tokens=2, max_steps=3), SamplingOptions(max_tokens=100, seed=0))
    assert all(opts.max_tokens == 2 and opts.stop == () for _, _, opts in engine.calls)
    assert engine.aborted == []  # no delimiter is looked for
    assert deltas[-1].finish_reason == "length"  # max_steps reached
    assert len(deltas[-1].search.rounds) == 3


def test_max_tokens_ends_a_solution():
    deltas = run(StepEngine(steps=5), beam(), SamplingOptions(max_tokens=5, seed=0))
    assert sum(len(d.token_ids) for d in deltas) <= 5 and deltas[-1].finish_reason == "length"


def test_weighted_majority_picks_the_answer_with_the_largest_summed_score():
    assert weighted_majority(["a", "b", "a", None], [0.3, 0.5, 0.3, 9.0]) == 0  # a: 0.6 > b: 0.5
    assert weighted_majority(["a", "b", "a"], [0.1, 0.5, 0.3]) == 1  # b: 0.5 > a: 0.4
    assert weighted_majority([None, None], [1.0, 2.0]) is None


def test_the_pure_parts_on_hand_made_cases():
    assert step_end(decode, [1, NL, 2, NL, NL, 3], "\n\n") == 5
    assert step_end(decode, [1, NL, 2], "\n\n") is None
    assert top_k([0.1, 0.5, 0.5, 0.2], 3) == [1, 2, 3]
    assert shared_steps([(1, 2, 3), (1, 2, 4), (1, 2)]) == 2 and shared_steps([(1,), (2,)]) == 0
    assert [aggregate([0.5, 0.2, 0.8], how) for how in ("last", "min", "prod", "mean")] == pytest.approx(
        [0.8, 0.2, 0.08, 0.5])


LIMITS = SearchLimits(max_candidates=16, max_block_tokens=32)


@pytest.mark.parametrize("entry, param", [
    ({"type": "beam", "beam_width": 4, "expansions": 8, "scorer": "prm"}, "search.expansions"),
    ({"type": "beam", "beam_width": 0, "expansions": 2, "scorer": "prm"}, "search.beam_width"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "demo-verifier"}, "search.scorer"),
    ({"type": "dvts", "n": 6, "beam_width": 4, "scorer": "prm"}, "search.n"),
    ({"type": "particle_filter", "particles": 4, "scorer": "prm", "resample_temperature": 0}, 
     "search.resample_temperature"),
    ({"type": "particle_filter", "particles": 4, "scorer": "prm", "weighting": "rank"}, "search.weighting"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "prm", "step_tokens": 64}, "search.step_tokens"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "prm", "step_tokens": 4, "step_delimiter": "\n"},
     "search.step_tokens"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "prm", "step_delimiter": ""}, "search.step_delimiter"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "prm", "aggregate": "max"}, "search.aggregate"),
    ({"type": "beam", "beam_width": 2, "expansions": 2, "scorer": "prm", "answers": "exact"}, "search.answers"),
    ({"type": "dvts", "n": 4, "beam_width": 2, "scorer": "prm", "max_steps": 0}, "search.max_steps"),
])
def test_bad_step_search_parameters_name_the_field(entry, param):
    with pytest.raises(GuidanceError) as caught:
        parse_search(entry, ["prm", "demo-verifier"], LIMITS, step_scorers=["prm"])
    assert caught.value.param == param, caught.value.message


def test_valid_step_search_specs():
    spec = parse_search({"type": "beam", "beam_width": 4, "expansions": 4, "scorer": "prm",
                         "answers": "demo-verifier", "aggregate": "min"}, ["prm"], LIMITS, step_scorers=["prm"])
    assert spec.candidates_per_pick == 16 and spec.step_delimiter == "\n\n" and spec.aggregate == "min"
    spec = parse_search({"type": "dvts", "n": 16, "beam_width": 4, "scorer": "prm", "step_tokens": 8},
                        ["prm"], LIMITS, step_scorers=["prm"])
    assert spec.candidates_per_pick == 16 and spec.step_tokens == 8
