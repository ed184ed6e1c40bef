"""bench.prefix_scores on hand-made data: AUROC and pairwise accuracy with ties, the server's pruning
rule at one checkpoint, survival of a right candidate (pruned, random, none) and the short-sample rule."""

from __future__ import annotations

import math
import numpy as np
import pytest

from bench.prefix_scores import (
    FULL,
    auroc,
    draws,
    evaluate,
    pairwise_accuracy,
    plain_best_of_n,
    prompt_groups,
    pruned_candidates,
    random_survival,
    score_prefixes,
    simulate_survival,
)
from guidance.search.scorers import Completion, Scorer
from models.training.rollouts import RolloutRecord

T, F = True, False
NAN = math.nan


def test_auroc_counts_ties_as_half():
    # pairs (right, wrong): 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1
    assert auroc(np.array([0.9, 0.5, 0.5, 0.1]), np.array([T, T, F, F])) == pytest.approx(3.5 / 4)
    assert auroc(np.array([0.2, 0.2, 0.2]), np.array([T, F, F])) == 0.5
    assert auroc(np.array([0.0, 1.0]), np.array([T, F])) == 0.0
    assert auroc(np.array([0.3, 0.4]), np.array([F, F])) is None


def test_pairwise_accuracy_pairs_within_a_prompt_only():
    scores = np.array([1.0, 0.0, 0.0, 1.0, 0.0])
    right = np.array([T, F, T, F, F])
    groups = np.array([0, 0, 1, 1, 1])
    # prompt 0: 1.0 > 0.0; prompt 1: 0.0 < 1.0, 0.0 = 0.0 (1/2): 1.5 of 3 pairs
    assert pairwise_accuracy(scores, right, groups) == (pytest.approx(0.5), 3)
    # pooled, the cross-prompt pairs count too: 3.5 of 6
    assert auroc(scores, right) == pytest.approx(3.5 / 6)
    assert pairwise_accuracy(scores, np.array([T, T, F, F, F]), groups) == (None, 0)  # no prompt has both


def test_pruned_candidates_follow_the_server_rule():
    scores = np.array([0.3, 0.1, 0.1, 0.9])
    assert pruned_candidates(scores, np.array([T, T, T, T]), 0.5, 1) == [2, 1]  # ties: the later one first
    assert pruned_candidates(scores, np.array([T, F, T, T]), 0.5, 1) == [2]  # floor(3 live / 2)
    assert pruned_candidates(scores, np.array([F, F, F, T]), 0.5, 1) == []
    assert pruned_candidates(np.array([0.5, 0.4]), np.array([T, T]), 1.0, 1) == [1]  # keeps min_keep


def test_random_survival_is_hypergeometric():
    everyone = np.array([T, T, T, T])
    assert random_survival(np.array([T, F, F, F]), everyone, 2) == pytest.approx(1 - 3 / 6)
    assert random_survival(np.array([T, T, F, F]), everyone, 2) == pytest.approx(1 - 1 / 6)
    assert random_survival(np.array([T, T, F, F]), everyone, 1) == 1.0
    assert random_survival(np.array([F, F, F, F]), everyone, 2) == 0.0
    assert random_survival(np.array([T, F, F, F]), np.array([F, T, T, T]), 2) == 1.0  # finished: never dropped


def test_survival_never_prunes_a_finished_sample():
    # checkpoint t = 4; sample 0 is right but finished with 3 tokens (not scored: NaN);
    # in samples 4..7 the right one scores lowest
    scores = np.array([NAN, 0.5, 0.6, 0.7, 0.1, 0.5, 0.6, 0.7])
    right = np.array([T, F, F, F, T, F, F, F])
    lengths = np.array([3, 10, 6, 8, 10, 10, 10, 10])
    survival = simulate_survival(scores, right, lengths, 4, [np.arange(4), np.arange(4, 8)], 0.5, 1)
    assert survival.pruned == 0.5  # kept in the first draw (1 of 3 live dropped: sample 1), pruned in the second
    assert survival.random == pytest.approx((1 + 0.5) / 2)
    assert survival.unpruned == 1.0
    # tokens: draw 1 generates 27, dropping sample 1 saves 10 - 4, at random 1/3 of (6 + 2 + 4);
    # draw 2 generates 40, dropping 2 saves 2 x 6, at random the same
    assert survival.unpruned_tokens == (27 + 40) / 2
    assert survival.pruned_tokens == (21 + 28) / 2
    assert survival.random_tokens == pytest.approx((27 - 4 + 28) / 2)


def test_survival_of_whole_completions_treats_every_sample_as_live():
    scores, right, lengths = np.array([0.1, 0.9, 0.5, 0.4]), np.array([T, F, F, F]), np.array([2, 9, 9, 9])
    survival = simulate_survival(scores, right, lengths, None, [np.arange(4)], 0.5, 1)
    assert (survival.pruned, survival.random, survival.unpruned) == (0.0, 0.5, 1.0)
    assert survival.pruned_tokens == survival.random_tokens == survival.unpruned_tokens == 29


def test_plain_best_of_n_is_exact():
    right = np.array([T, F, F, F, F, F])
    lengths = np.array([2, 4, 6, 2, 4, 6])
    groups = np.array([0, 0, 0, 1, 1, 1])
    # prompt 0: 1 - C(2, 2) / C(3, 2) = 2/3; prompt 1: no right sample
    assert plain_best_of_n(right, lengths, groups, 2) == (pytest.approx(1 / 3), pytest.approx(2 * 4.0))
    assert plain_best_of_n(right, lengths, groups, 3)[0] == 0.5


def test_draws_are_seeded_and_within_a_prompt():
    groups = np.repeat([0, 1], 6)
    picks = draws(groups, 4, 3, seed=0)
    assert len(picks) == 6
    for k, pick in enumerate(picks):
        assert len(set(pick.tolist())) == 4 and set(groups[pick].tolist()) == {k // 3}
    assert all((a == b).all() for a, b in zip(picks, draws(groups, 4, 3, seed=0)))


def test_evaluate_scores_only_live_samples():
    # at t = 2 sample 0 (2 tokens, the stop token counted) has finished: not live, NaN
    right, lengths, groups = np.array([T, F, T]), np.array([2, 3, 3]), np.zeros(3, dtype=int)
    row = evaluate(np.array([NAN, 0.2, 0.8]), right, lengths, groups, 2, {2: [np.arange(3)]}, 0.5, 1)
    assert (row["tokens"], row["live"], row["auroc"], row["pairwise_accuracy"], row["pairs"]) == (2, 2, 1.0, 1.0, 1)
    assert (row["right_live"], row["right_finished"]) == (0.5, 1.0)
    assert row["survival"]["2"] == {"pruned": 1.0, "random": 1.0, "unpruned": 1.0, "pruned_tokens": 7.0,
                                    "random_tokens": 7.0, "unpruned_tokens": 8.0}
    assert evaluate(np.array([0.1, 0.2, 0.8]), right, lengths, groups, None, {}, 0.5, 1)["tokens"] == FULL


def test_prompt_groups_number_prompts_in_order():
    records = [RolloutRecord(group, (1,), (5, 2), 0, 0.0) for group in ("r1/b", "r1/a", "r1/b")]
    assert prompt_groups(records).tolist() == [0, 1, 0]


class LastToken(Scorer):
    """Scores a completion by its last token id; records each call's (prompt ids, completions)."""

    name, kind = "last", "model"

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[Completion]]] = []

    def score(self, prompt_text, prompt_ids, completions):
        self.calls.append((list(prompt_ids), list(completions)))
        return [float(c.token_ids[-1]) for c in completions]


def test_score_prefixes_scores_live_prefixes_one_call_per_prompt():
    records = [RolloutRecord("a", (1, 2), (5, 2), 0, 1.0), RolloutRecord("a", (1, 2), (5, 6, 7), 0, 0.0),
               RolloutRecord("b", (3,), (8, 9, 4, 2), 0, 0.0)]
    scorer = LastToken()
    scores = score_prefixes(scorer, records, prompt_groups(records), 2, lambda ids: "".join(map(str, ids)))
    np.testing.assert_array_equal(scores, [NAN, 6.0, 9.0])  # record 0 has 2 tokens: finished at t = 2
    assert [(prompt, [c.token_ids for c in completions]) for prompt, completions in scorer.calls] == \
        [([1, 2], [(5, 6)]), ([3], [(8, 9)])]
    assert scorer.calls[0][1][0].text == "56"
    assert score_prefixes(LastToken(), records, prompt_groups(records), None, str).tolist() == [2.0, 7.0, 2.0]
