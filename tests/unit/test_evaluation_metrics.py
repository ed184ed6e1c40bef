"""`alignserve eval` metrics on hand-made samples: pass@1, maj@k (ties, None answers), KL accounting."""

from __future__ import annotations

import math

import pytest

from workflows.evaluation.configs import BASE, EvalConfig
from workflows.evaluation.metrics import (
    best_of_n_kl,
    kl_source,
    maj_at_k,
    majority_answer,
    pass_at_1,
    selection_kl,
    summarize,
)
from workflows.evaluation.samples import Sample


def sample(prompt: int, j: int, reward: float, answer=None, kl: float = 0.0, tokens: int = 4,
           steps: int | None = None, generated: int | None = None) -> Sample:
    return Sample(prompt_index=prompt, prompt_id=str(prompt), sample=j, seed=j, text="", reward=reward,
                  answer=answer, kl=kl, steps=(tokens if kl else 0) if steps is None else steps,
                  completion_tokens=tokens, generated_tokens=generated)


QSHARP = EvalConfig("q@4", "qsharp", 4.0, guidance=({"type": "qsharp", "model": "v", "strength": 4.0},))
BO4 = EvalConfig("bo4", "best-of-n", 4.0, search={"type": "best_of_n", "n": 4, "scorer": "s"})
SOFT_BO4 = EvalConfig("soft-bo4", "best-of-n", 4.0, search={"type": "best_of_n", "n": 4, "scorer": "s",
                                                            "temperature": 1.0})
GUIDED_BO4 = EvalConfig("q+bo4", "q+bo", 4.0, guidance=QSHARP.guidance, search=BO4.search)
BLOCKWISE = EvalConfig("bw", "blockwise", 4.0, search={"type": "blockwise", "candidates": 4, "block_tokens": 2,
                                                       "scorer": "s"})
GUIDED_BLOCKWISE = EvalConfig("q+bw", "blockwise", 4.0, guidance=QSHARP.guidance, search=BLOCKWISE.search)


def test_pass_at_1_is_the_mean_reward():
    assert pass_at_1([sample(0, 0, 1.0), sample(0, 1, 0.0), sample(1, 0, 0.5), sample(1, 1, 1.0)]) == 0.625


def test_majority_answer_ignores_none_and_breaks_ties_by_first_occurrence():
    assert majority_answer([None, 5, 7, 7, None, 5]) == 5  # 5 and 7 tie twice each: 5 came first
    assert majority_answer([7, 5, 5]) == 5
    assert majority_answer([None, None, 3]) == 3  # a lone answer beats any number of Nones
    assert majority_answer([None, None]) is None
    assert majority_answer([]) is None


def test_maj_at_k_per_prompt():
    samples = [
        # prompt 0: majority 7 (twice), and one sample carrying 7 is right -> 1
        sample(0, 0, 1.0, 7), sample(0, 1, 0.0, 5), sample(0, 2, 0.0, 7),
        # prompt 1: tie 5 / 7, 5 first, 5 is wrong (the right 7 loses the tie) -> 0
        sample(1, 0, 0.0, 5), sample(1, 1, 1.0, 7), sample(1, 2, 0.0, None),
        # prompt 2: no sample gives an answer -> 0
        sample(2, 0, 0.0, None), sample(2, 1, 0.0, None), sample(2, 2, 0.0, None),
        # prompt 3: None is not an answer; the only answer is right -> 1
        sample(3, 0, 0.0, None), sample(3, 1, 0.0, None), sample(3, 2, 1.0, 4),
    ]
    assert maj_at_k(samples) == 0.5


def test_best_of_n_kl_estimate():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert all(best_of_n_kl(n) < math.log(n) for n in range(2, 64))
    with pytest.raises(ValueError, match="at least 1"):
        best_of_n_kl(0)


def test_selection_kl_and_source_per_kind():
    assert selection_kl(BASE) == (0.0, None) and kl_source(BASE) == "reported"
    assert kl_source(QSHARP) == "reported"
    assert selection_kl(BO4) == (pytest.approx(math.log(4) - 0.75), "log N - (N-1)/N bound")
    assert kl_source(BO4) == "log N - (N-1)/N bound"
    assert selection_kl(SOFT_BO4) == (pytest.approx(math.log(4)), "log N bound")
    assert kl_source(GUIDED_BO4) == "reported + log N - (N-1)/N bound"
    assert selection_kl(BLOCKWISE) == (None, "selection KL not estimated")
    assert kl_source(BLOCKWISE) == "selection KL not estimated"
    assert kl_source(GUIDED_BLOCKWISE) == "reported; selection KL not estimated"


def test_summarize_guided_and_base():
    base = summarize(BASE, [sample(0, 0, 1.0, 3), sample(0, 1, 0.0, 4)], 1.5, with_majority=True)
    assert (base.pass_at_1, base.maj_at_k, base.mean_kl, base.kl_per_token) == (0.5, 1.0, 0.0, 0.0)
    assert (base.prompts, base.samples_per_prompt, base.tokens, base.tokens_counted) == (1, 2, 8, "all generated")
    guided = summarize(QSHARP, [sample(0, 0, 1.0, kl=0.2, tokens=4), sample(1, 0, 1.0, kl=0.6, tokens=6)], 2.0,
                       with_majority=False)
    assert guided.maj_at_k is None
    assert guided.mean_kl == pytest.approx(0.4)
    assert guided.kl_per_token == pytest.approx(0.8 / 10)  # sum of KL / sum of tokens
    assert guided.kl_complete and guided.seconds == 2.0


def test_summarize_best_of_n_adds_the_estimate_to_the_reported_kl():
    samples = [sample(0, 0, 1.0, kl=0.5, tokens=5), sample(0, 1, 0.0, kl=0.1, tokens=5)]
    row = summarize(GUIDED_BO4, samples, 1.0, with_majority=False)
    assert row.reported_kl == pytest.approx(0.3)
    assert row.mean_kl == pytest.approx(0.3 + math.log(4) - 0.75)
    assert row.kl_per_token == pytest.approx(row.mean_kl * 2 / 10)
    assert row.tokens_counted == "kept candidates only"


def test_summarize_blockwise_does_not_invent_a_kl():
    plain = summarize(BLOCKWISE, [sample(0, 0, 1.0)], 1.0, with_majority=False)
    assert plain.mean_kl is None and plain.kl_per_token is None and not plain.kl_complete
    guided = summarize(GUIDED_BLOCKWISE, [sample(0, 0, 1.0, kl=0.25)], 1.0, with_majority=False)
    assert guided.mean_kl == pytest.approx(0.25) and not guided.kl_complete


def test_summarize_counts_generated_tokens_and_steered_positions():
    pruned = EvalConfig("bo4p", "best-of-n pruned", 4.0, search={**BO4.search, "prune": {"scorer": "v", "every": 2,
                                                                                         "fraction": 0.5}})
    row = summarize(pruned, [sample(0, 0, 1.0, tokens=5, generated=11), sample(0, 1, 0.0, tokens=5, generated=13)],
                    1.0, with_majority=False)
    assert row.generated_tokens_per_sample == 12.0 and row.steered_fraction is None
    assert row.mean_kl == pytest.approx(math.log(4)) and row.kl_source == "log N bound"  # keeps one of N
    gated = summarize(QSHARP, [sample(0, 0, 1.0, kl=0.2, tokens=4, steps=1), sample(1, 0, 1.0, kl=0.1, tokens=6,
                                                                                   steps=4)], 1.0, with_majority=False)
    assert gated.steered_fraction == pytest.approx(5 / 10) and gated.generated_tokens_per_sample == 5.0
