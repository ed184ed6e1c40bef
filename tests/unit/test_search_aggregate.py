"""best_of_n with `aggregate`: validated against the step scorers, and the kept candidate is the one with
the best aggregate of its step scores (a scripted engine, a scripted step scorer)."""

from __future__ import annotations

import pytest

from guidance.errors import GuidanceError
from guidance.search.scorers import Completion, Scorer, ScorerInputTooLong
from guidance.search.spec import BestOfN, SearchLimits, parse_search
from server.engine import SamplingOptions
from server.errors import ContextLengthExceeded
from tests.unit.test_search_runner import ScriptedEngine, run, searcher

LIMITS = SearchLimits(max_candidates=8, max_block_tokens=16)


def parse(entry):
    return parse_search(entry, ["prm", "rm"], LIMITS, step_scorers=["prm"])


def test_aggregate_needs_a_step_scorer_and_a_known_name():
    spec = parse({"type": "best_of_n", "n": 4, "scorer": "prm", "aggregate": "min"})
    assert spec.aggregate == "min"
    assert parse({"type": "best_of_n", "n": 4, "scorer": "rm"}).aggregate is None
    with pytest.raises(GuidanceError) as info:
        parse({"type": "best_of_n", "n": 4, "scorer": "rm", "aggregate": "last"})
    assert info.value.param == "search.aggregate" and "'rm' scores whole completions" in info.value.message
    with pytest.raises(GuidanceError) as info:
        parse({"type": "best_of_n", "n": 4, "scorer": "prm", "aggregate": "max"})
    assert info.value.param == "search.aggregate"
    with pytest.raises(GuidanceError) as info:
        parse({"type": "blockwise", "candidates": 2, "block_tokens": 4, "scorer": "prm", "aggregate": "min"})
    assert info.value.param == "search.aggregate"  # best_of_n only


class StepScorer(Scorer):
    """Candidate texts are one digit repeated ("000", "111", ...); with delimiter "1" the "111" candidate
    has three steps. Each step of it scores 0.9, the one step of any other 0.8; whole completions score
    by `whole` (digit -> score)."""

    name, kind, step_delimiter = "prm", "prm", "1"

    def __init__(self, whole: dict[str, float]) -> None:
        self.whole, self.steps = whole, []

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        return [self.whole[c.text[0]] for c in completions]

    def score_steps(self, prompt_text, prompt_ids, completions, reference=None):
        self.steps.append([list(c) for c in completions])
        return [[0.9 if steps[0].text.startswith("1") else 0.8] * len(steps) for steps in completions]


@pytest.mark.parametrize("how, kept, score", [(None, 2, 0.7), ("min", 1, 0.9), ("last", 1, 0.9), ("mean", 1, 0.9),
                                              ("prod", 0, 0.8)])
def test_best_of_n_keeps_the_best_aggregate_of_step_scores(how, kept, score):
    scorer = StepScorer({"0": 0.5, "1": 0.1, "2": 0.7})
    options = SamplingOptions(max_tokens=3, n=1, seed=0)
    [delta] = run(searcher(ScriptedEngine(), scorer), [1, 2], "p", options,
                  BestOfN(type="best_of_n", n=3, scorer="prm", aggregate=how))
    assert delta.search.selected == kept and delta.search.score == pytest.approx(score)
    if how == "prod":  # 0.8, 0.9^3 = 0.729, 0.8: ties keep the first
        assert delta.search.candidate_scores == pytest.approx((0.8, 0.729, 0.8))
    if how is not None:
        [steps] = scorer.steps
        # "111" (token ids (1, 1, 1)) cut after each "1", each step with its token.
        assert steps[1] == [Completion("1", (1,))] * 3 and steps[0] == [Completion("000", (0, 0, 0))]
    else:
        assert scorer.steps == []


class TooLong(Scorer):
    name, kind = "rm", "reward_model"

    def score(self, prompt_text, prompt_ids, completions, reference=None):
        raise ScorerInputTooLong("The scorer 'rm' reads at most 4 tokens; candidate 0 is 9 of its tokens")


def test_a_candidate_too_long_for_the_scorer_is_a_400_on_max_tokens():
    with pytest.raises(ContextLengthExceeded) as info:
        run(searcher(ScriptedEngine(), TooLong()), [1], "p", SamplingOptions(max_tokens=2, n=1, seed=0),
            BestOfN(type="best_of_n", n=2, scorer="rm"))
    assert info.value.param == "max_tokens" and "reads at most 4 tokens" in info.value.message
