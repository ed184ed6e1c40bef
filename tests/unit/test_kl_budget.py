"""KL budgets: the controller on hand-made logits against a float64 reference bisection, the
composition rule, the validation of budgets, a request's own budget folded into its entries, and a
GuidanceBatch steering budgeted rows."""

from __future__ import annotations

import math

import pytest
import torch

from guidance.batch import GuidanceBatch
from guidance.divergence import kl_guided_to_base, split_at_candidates
from guidance.errors import GuidanceError
from guidance.kl_budget import (
    BISECTION_STEPS, KLBudget, allowance, largest_fitting_scale, request_budget, spend, under)
from guidance.modules.qsharp import bernoulli_offsets
from guidance.params import MAX_STRENGTH
from guidance.spec import parse_guidance
from tests.guidance_batch_reference import (  # noqa: F401  (catalog, models: fixtures)
    V, catalog, models, reference_kl, reference_offsets)
from tests.unit.test_guidance_spec import CATALOG

STEP = 2.0 ** -BISECTION_STEPS


def reference_scale(kl_at, allowed: float, iterations: int = 60) -> float:
    """The largest t in [0, 1] with kl_at(t) <= allowed, by float64 bisection (kl_at non-decreasing)."""
    if kl_at(1.0) <= allowed:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if kl_at(middle) <= allowed else (low, middle)
    return low


def exact_kl(logits: torch.Tensor, offsets: torch.Tensor, temperature: float) -> float:
    """KL(softmax((l + d) / T) || softmax(l / T)) of one row, in float64 from the definition."""
    log_p = torch.log_softmax(logits.double() / temperature, -1)
    log_q = torch.log_softmax((logits.double() + offsets.double()) / temperature, -1)
    return float((log_q.exp() * (log_q - log_p)).sum())


def test_the_scale_is_the_largest_whose_kl_fits_and_matches_a_float64_bisection():
    """Linear offsets t * d on whole-vocabulary rows at temperatures 1, 0.7 and 2."""
    torch.manual_seed(0)
    logits, offsets = torch.randn(3, 50) * 2, torch.randn(3, 50) * 3
    temperature = torch.tensor([1.0, 0.7, 2.0])
    allowed = torch.tensor([0.05, 0.3, 0.01])

    def kl_at(t):
        return kl_guided_to_base(logits, t.unsqueeze(1) * offsets, temperature)

    scale = largest_fitting_scale(kl_at, allowed)
    assert bool((kl_at(scale) <= allowed).all())  # the spent KL never exceeds the allowance
    assert bool((kl_at(scale + 2 * STEP) > allowed).all())  # and a step more would
    for row in range(3):
        expected = reference_scale(
            lambda t: exact_kl(logits[row], t * offsets[row], float(temperature[row])), float(allowed[row]))
        assert 0 < expected < 1
        assert float(scale[row]) == pytest.approx(expected, abs=4 * STEP + 1e-6 * expected)


def test_nonlinear_qsharp_offsets_on_candidates_fit_like_the_report():
    """Q-sharp's Bernoulli offsets log(1 - p + p e^(t eta)) at k candidates, with the KL that the batch
    records (`CandidateSplit.kl`), against a float64 bisection of the definition."""
    torch.manual_seed(1)
    logits, value_logits = torch.randn(2, 40) * 2, torch.randn(2, 5) * 2
    candidates = torch.topk(logits, 5).indices
    split = split_at_candidates(logits.clone(), candidates)
    eta = torch.tensor([[8.0], [20.0]])
    allowed = torch.tensor([0.1, 0.02])

    def kl_at(t):
        return split.kl(bernoulli_offsets(value_logits, eta * t.unsqueeze(1)))

    scale = largest_fitting_scale(kl_at, allowed)
    assert bool((kl_at(scale) <= allowed).all())
    for row in range(2):
        def row_kl(t):
            d = torch.zeros(40, dtype=torch.float64)
            d[candidates[row]] = bernoulli_offsets(value_logits[row].double(), eta[row].double() * t)
            return exact_kl(logits[row], d, 1.0)

        assert float(scale[row]) == pytest.approx(reference_scale(row_kl, float(allowed[row])), abs=1e-5)


def test_unbounded_rows_keep_their_strength_spent_rows_get_zero_and_fitting_rows_their_cap():
    logits, offsets = torch.randn(4, 30), torch.randn(4, 30) * 2

    def kl_at(t):
        return kl_guided_to_base(logits, t.unsqueeze(1) * offsets)

    full = kl_at(torch.ones(4))
    allowed = torch.tensor([math.inf, 0.0, float(full[2]) * 2, float(full[3]) / 2])
    scale = largest_fitting_scale(kl_at, allowed)
    assert scale[0] == 1.0 and scale[1] == 0.0 and scale[2] == 1.0
    assert 0 < scale[3] < 1 and kl_at(scale)[3] <= allowed[3]
    # every row fits: no bisection, every scale 1 (but the spent row's 0)
    zero_offsets = largest_fitting_scale(lambda t: torch.zeros(2), torch.tensor([0.0, 1.0]))
    assert zero_offsets.tolist() == [0.0, 1.0]


def test_allowance_is_the_per_token_bound_or_what_is_left_of_the_response_budget():
    inf = math.inf
    max_kl = torch.tensor([1.0, 1.0, inf, 2.0, inf])
    per_token = torch.tensor([inf, 0.1, 0.2, 0.5, inf])
    spent = torch.tensor([0.25, 0.95, 3.0, 2.5, 7.0])
    assert allowance(max_kl, per_token, spent).tolist() == pytest.approx([0.75, 0.05, 0.2, 0.0, inf])


def test_composition_takes_the_tightest_budget_of_the_entries():
    assert request_budget([{"strength": 1.0}]) is None
    assert request_budget([{"max_kl": 2.0, "kl_per_token": None}, {"max_kl": 0.5}, {"kl_per_token": 0.1}]) == \
        KLBudget(max_kl=0.5, kl_per_token=0.1)
    assert request_budget([{"kl_per_token": 0.3}, {"kl_per_token": 0.2}]) == KLBudget(None, 0.2)


def test_spend_takes_what_was_spent_off_every_max_kl():
    entries = ({"type": "arm", "max_kl": 1.0}, {"type": "cd", "kl_per_token": 0.1}, {"type": "qsharp", "max_kl": 0.2})
    assert spend(entries, 0.5) == ({"type": "arm", "max_kl": 0.5}, {"type": "cd", "kl_per_token": 0.1},
                                   {"type": "qsharp", "max_kl": 0.0})


def test_a_budget_without_strength_caps_at_the_maximum_strength():
    [entry] = parse_guidance([{"type": "arm", "model": "arm", "max_kl": 2.0}], CATALOG)
    assert entry.params.strength == MAX_STRENGTH
    assert entry.describe() == {"type": "arm", "model": "arm", "strength": MAX_STRENGTH, "top_k": -1,
                                "min_entropy": 0.0, "max_kl": 2.0}


@pytest.mark.parametrize(
    ("entry", "param", "words"),
    [
        ({"max_kl": -1.0}, "guidance[0].max_kl", "greater than or equal to 0"),
        ({"max_kl": float("inf")}, "guidance[0].max_kl", "finite"),
        ({"max_kl": "a lot"}, "guidance[0].max_kl", "number"),
        ({"kl_per_token": -0.1}, "guidance[0].kl_per_token", "greater than or equal to 0"),
        ({"kl_per_token": float("nan")}, "guidance[0].kl_per_token", "finite"),
        ({"max_kl": None}, "guidance[0].strength", "Missing"),  # no budget: strength is required
    ],
)
def test_bad_budgets_name_the_field(entry, param, words):
    with pytest.raises(GuidanceError) as info:
        parse_guidance([{"type": "arm", "model": "arm", **entry}], CATALOG)
    assert info.value.param == param and words in info.value.message


@pytest.mark.parametrize(
    ("entry", "request_", "folded"),
    [
        ({"max_kl": 2.0}, KLBudget(max_kl=0.5), {"max_kl": 0.5, "kl_per_token": None}),  # the request is tighter
        ({"max_kl": 0.5}, KLBudget(max_kl=2.0), {"max_kl": 0.5, "kl_per_token": None}),  # the entry is tighter
        ({}, KLBudget(max_kl=1.0), {"max_kl": 1.0, "kl_per_token": None}),  # only the request gives one
        ({}, KLBudget(kl_per_token=0.1), {"max_kl": None, "kl_per_token": 0.1}),
        ({"kl_per_token": 0.3}, KLBudget(kl_per_token=0.1), {"max_kl": None, "kl_per_token": 0.1}),
        # each bound on its own: the entry's per-token bound and the request's response bound both stay
        ({"max_kl": 2.0, "kl_per_token": 0.05}, KLBudget(max_kl=1.0, kl_per_token=0.1),
         {"max_kl": 1.0, "kl_per_token": 0.05}),
        ({"kl_per_token": 0.05}, KLBudget(max_kl=1.0), {"max_kl": 1.0, "kl_per_token": 0.05}),
    ],
)
def test_a_request_budget_folds_into_each_entry_as_the_tighter_bound(entry, request_, folded):
    assert under({"strength": 1.0, **entry}, request_) == folded
    [resolved] = parse_guidance([{"type": "arm", "model": "arm", "strength": 3.0, **entry}], CATALOG, budget=request_)
    assert {name: getattr(resolved.params, name) for name in folded} == folded
    assert resolved.params.strength == 3.0


def test_folding_gives_the_request_budget_the_tightest_of_the_request_and_every_entry():
    entries = [{"type": "arm", "model": "arm", "strength": 2.0, "max_kl": 0.4},
               {"type": "cd", "model": "prefix", "strength": 1.0, "kl_per_token": 0.3}]
    for request_, tightest in [(KLBudget(max_kl=1.0, kl_per_token=0.1), KLBudget(0.4, 0.1)),
                               (KLBudget(max_kl=0.2), KLBudget(0.2, 0.3)),
                               (KLBudget(kl_per_token=0.5), KLBudget(0.4, 0.3))]:
        resolved = parse_guidance(entries, CATALOG, budget=request_)
        assert request_budget([g.params.model_dump() for g in resolved]) == tightest
        # the same budget as a further entry would give it: the one rule for entries and the request
        assert tightest == request_budget([*entries, request_.as_dict()])


def test_with_a_request_budget_entries_may_leave_strength_out():
    [entry] = parse_guidance([{"type": "qsharp", "model": "value"}], CATALOG, budget=KLBudget(max_kl=1.0))
    assert entry.params.strength == MAX_STRENGTH and entry.params.max_kl == 1.0
    with pytest.raises(GuidanceError) as info:  # without one, strength is still required
        parse_guidance([{"type": "qsharp", "model": "value"}], CATALOG)
    assert info.value.param == "guidance[0].strength"


@pytest.mark.parametrize(("entries", "budget", "param"), [
    ([], KLBudget(max_kl=1.0), "max_kl"), ([], KLBudget(kl_per_token=0.1), "kl_per_token"),
    ([], KLBudget(max_kl=1.0, kl_per_token=0.1), "max_kl"),
])
def test_a_request_budget_without_guidance_entries_names_its_field(entries, budget, param):
    with pytest.raises(GuidanceError) as info:
        parse_guidance(entries, CATALOG, budget=budget)
    assert info.value.param == param and "unguided request" in info.value.message


# A GuidanceBatch steering budgeted rows.

def reference_step(models, catalog, guidance, tokens, logits, temperature, allowed):
    """(scale, offsets, KL) of one budgeted row by full recompute and float64 bisection.

    Each entry's offsets at strength t s come from its offsets d at s: t d for the linear modules, and for
    Q-sharp's Bernoulli head log(1 - p + p e^(t s)) with p = (e^d - 1) / (e^s - 1) recovered from d."""
    at_cap = [(g, reference_offsets(models, catalog, [g], tokens, logits, temperature).double()) for g in guidance]

    def offsets(t):
        total = torch.zeros(V, dtype=torch.float64)
        for g, d in at_cap:
            if g.module.name == "qsharp":
                s = g.params.strength
                total += torch.log1p(torch.expm1(d) / math.expm1(s) * math.expm1(t * s))
            else:
                total += t * d
        return total

    scale = reference_scale(lambda t: exact_kl(logits, offsets(t), temperature), allowed)
    d = offsets(scale).float()
    return scale, d, reference_kl(logits, d, temperature)


SPECS = {
    "arm max_kl": [{"type": "arm", "model": "arm", "strength": 3.0, "max_kl": 0.6}],
    "q per token": [{"type": "qsharp", "model": "value", "strength": 6.0, "top_k": 5, "kl_per_token": 0.05}],
    "cd+genarm": [{"type": "cd", "model": "prefix", "strength": 4.0, "top_k": 6, "max_kl": 0.8},
                  {"type": "genarm", "model": "rlm", "strength": 2.0, "top_k": 10, "kl_per_token": 0.3}],
    "plain": [{"type": "arm", "model": "arm", "strength": 0.7}],
}


def test_budgeted_rows_steer_with_the_largest_fitting_strength_and_others_are_untouched(catalog, models):
    """Four rows (a response budget on a dense row, a per-token budget on Q-sharp candidates, a composition
    with both, and no budget), at temperatures 1, 0.8, 1.5 and 1, for 8 steps: every step's logits and KL
    are the reference's at its float64 bisection, and the reports stay within the budgets."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=32)
    requests = {row: {"key": key, "guidance": parse_guidance(SPECS[key], catalog), "prompt": [1, row + 2],
                      "output": [], "temperature": t, "kl": 0.0, "scales": []}
                for row, (key, t) in enumerate([("arm max_kl", 1.0), ("q per token", 0.8),
                                                ("cd+genarm", 1.5), ("plain", 1.0)])}
    for row, q in requests.items():
        batch.add(row, q["key"], q["guidance"], q["prompt"], q["output"], temperature=q["temperature"])
    generator = torch.Generator().manual_seed(5)
    for _ in range(8):
        logits = torch.randn(4, V, generator=generator) * 2
        out = batch.apply(logits.clone())
        for row, q in requests.items():
            budget = request_budget([g.params.model_dump() for g in q["guidance"]])
            max_kl, per_token = (math.inf, math.inf) if budget is None else (
                budget.max_kl or math.inf, budget.kl_per_token or math.inf)
            allowed = max(min(per_token, max_kl - q["kl"]), 0.0)
            tokens = q["prompt"] + q["output"]
            if budget is None:
                scale, d = 1.0, reference_offsets(models, catalog, q["guidance"], tokens, logits[row])
                kl = reference_kl(logits[row], d)
            else:
                scale, d, kl = reference_step(models, catalog, q["guidance"], tokens, logits[row],
                                              q["temperature"], allowed)
                # What the batch spent, exactly: within the allowance up to the float32 KL's rounding.
                assert exact_kl(logits[row], out[row] - logits[row], q["temperature"]) <= allowed + 2e-6
            if allowed > 1e-4:  # an allowance near the float32 KL's rounding (~1e-6) may pick another scale
                assert torch.allclose(out[row], logits[row] + d, atol=2e-4), q["key"]
            q["kl"] += kl
            q["scales"].append(scale)
            q["output"].append(int(out[row].argmax()))
    reports = batch.collect([q["key"] for q in requests.values()])
    for q in requests.values():
        report = reports[q["key"]]
        assert report.kl == pytest.approx(q["kl"], rel=1e-4, abs=1e-5), q["key"]
        if q["key"] == "plain":
            assert report.scale is None
            continue
        mean, low, high = report.scale
        assert high == pytest.approx(max(q["scales"]), abs=1e-4) and low <= min(q["scales"]) + 1e-3
        assert mean == pytest.approx(sum(q["scales"]) / 8, abs=1e-3), q["key"]
    assert reports["arm max_kl"].kl <= 0.6 * (1 + 1e-5)
    assert reports["cd+genarm"].kl <= 0.8 * (1 + 1e-5)
    assert reports["arm max_kl"].scale[1] == 0.0  # the response budget was spent: strength 0 at the end
    assert 0 < max(requests[1]["scales"]) < 1  # the per-token bound held the strength below its cap


def test_a_spent_budget_leaves_the_logits_unguided_and_survives_preemption(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    guidance = parse_guidance([{"type": "arm", "model": "arm", "max_kl": 0.3}], catalog)
    output: list[int] = []
    batch.add(0, "r", guidance, [1, 2, 3], output)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        out = batch.apply(torch.randn(1, V, generator=generator) * 2)
        output.append(int(out[0].argmax()))
    batch.remove(0)  # preempted, then resumed in another row
    batch.add(1, "r", guidance, [1, 2, 3], output)
    for _ in range(3):
        logits = torch.randn(2, V, generator=generator)
        out = batch.apply(logits.clone())
        output.append(int(out[1].argmax()))
    report = batch.collect(["r"])["r"]
    assert 0.3 * (1 - 1e-3) <= report.kl <= 0.3 * (1 + 1e-5)  # MAX_STRENGTH spends it all at once
    assert torch.equal(out[1], logits[1])  # less than KL_RESOLUTION left: exactly unguided
    assert report.steps == 6 and report.scale[1] == 0.0 and report.scale[2] > 0
