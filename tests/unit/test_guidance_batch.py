"""GuidanceBatch against an independent full-recompute reference, through joins, leaves and moves."""

from __future__ import annotations

import pytest
import torch

from guidance.batch import GuidanceBatch
from guidance.loading import load_guide_models
from guidance.spec import parse_guidance
from tests.guidance_batch_reference import (  # noqa: F401  (catalog, models: fixtures)
    SPECS, V, FakeEngine, catalog, models, reference_kl, reference_offsets)


def test_no_guided_rows_is_a_no_op(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=32)
    logits = torch.randn(3, V)
    assert batch.apply(logits) is logits


def test_rows_join_leave_and_move_and_match_full_recompute(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models)
    engine.add(0, "a", "q", [1, 5, 9])
    engine.step()
    engine.add(1, "b", "hist+cd", [1, 7])
    engine.add(2, "c", "arm+genarm", [1, 3, 3, 8, 2])
    engine.step()
    engine.step()
    engine.move(2, 1, swap=True)
    engine.step()
    engine.remove(0)
    engine.move(2, 0, swap=False)  # condense: b goes from row 2 to row 0
    engine.step()
    engine.add(2, "d", "q", [1, 4])  # reuses freed slots
    engine.step()
    engine.step()
    keys = ["a", "b", "c", "d"]
    reports = batch.collect(keys)
    assert set(reports) == set(keys)
    for key in keys:
        assert reports[key].kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6)
    assert {k: r.steps for k, r in reports.items()} == {"a": 4, "b": 6, "c": 6, "d": 2}
    assert batch.collect(keys) == {}  # each report is handed out once


def test_strength_zero_rows_are_untouched(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=16)
    batch.add(0, "z", parse_guidance(SPECS["zero"], catalog), [1, 2], [])
    assert batch.num_guided == 0
    logits = torch.randn(1, V)
    assert torch.equal(batch.apply(logits.clone()), logits)


def test_report_survives_preemption_and_resume(catalog, models):
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    engine = FakeEngine(batch, catalog, models, seed=3)
    engine.add(0, "p", "q", [1, 2, 3])
    engine.step()
    engine.step()
    request = engine.rows[0]
    engine.batch.remove(0)  # preempted: leaves the batch, output kept
    del engine.rows[0]
    engine.rows[1] = request
    batch.add(1, "p", request["guidance"], request["prompt"], request["output"],
              temperature=request["temperature"])  # resumes: guide caches re-prefilled
    engine.step()
    report = batch.collect(["p"])["p"]
    assert report.steps == 3
    assert report.kl == pytest.approx(engine.expected_kl["p"], rel=1e-4)


def test_partial_prefill_steps_are_not_counted(catalog, models):
    """A step that samples nothing (output unchanged) is overwritten by the one that samples."""
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    guidance = parse_guidance(SPECS["q"], catalog)
    output: list[int] = []
    batch.add(0, "k", guidance, [1, 2, 3, 4], output)
    batch.apply(torch.randn(1, V))  # a prefill chunk: nothing sampled
    logits = torch.randn(1, V)
    d = reference_offsets(models, catalog, guidance, [1, 2, 3, 4], logits[0])
    batch.apply(logits.clone())
    output.append(5)
    report = batch.collect(["k"])["k"]
    assert report.steps == 1
    assert report.kl == pytest.approx(reference_kl(logits[0], d), rel=1e-4)


def test_kl_is_reported_at_each_rows_sampling_temperature(catalog, models):
    """Rows at temperatures 0.5, 2 and 0 (greedy: reported at 1) in one batch, through joins,
    a swap, a condensing move and a temperature-1 row reusing a freed stat row."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models, seed=7)
    engine.add(0, "cold", "q", [1, 5, 9], temperature=0.5)
    engine.add(1, "hot", "arm+genarm", [1, 7], temperature=2.0)
    engine.add(2, "greedy", "hist+cd", [1, 3, 3], temperature=0.0)
    engine.step()
    engine.step()
    engine.move(2, 0, swap=True)
    engine.step()
    engine.remove(1)
    engine.move(2, 1, swap=False)
    engine.step()
    engine.add(2, "plain", "q", [1, 4])  # takes the stat row "hot" freed: its temperature is rewritten
    engine.step()
    reports = batch.collect(["cold", "hot", "greedy", "plain"])
    for key, report in reports.items():
        assert report.kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
    assert {k: r.steps for k, r in reports.items()} == {"cold": 5, "hot": 3, "greedy": 5, "plain": 1}


def test_every_row_dense_at_temperature_one_then_mixed(catalog, models):
    """Only whole-vocabulary entries: every row is a dense row, and one group fills them all (its offsets
    are the dense offsets as they are), first at temperature 1 everywhere (no division by T), then with a
    hot row, a greedy row and a gated entry (two dense groups, some entries closed)."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models, seed=11, spread=True)
    engine.add(0, "a", "arm", [1, 5, 9])
    engine.add(1, "b", "arm", [1, 7])
    engine.step()
    engine.step()
    engine.add(2, "hot", "arm", [1, 3, 3], temperature=2.0)
    engine.step()
    engine.add(3, "greedy", "gated+arm whole", [1, 4], temperature=0.0)
    engine.step()
    engine.move(3, 0, swap=True)
    engine.step()
    keys = ["a", "b", "hot", "greedy"]
    reports = batch.collect(keys)
    for key in keys:
        assert reports[key].kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
        assert reports[key].steps == engine.expected_steps[key], key


def test_temperature_changes_the_report_and_greedy_equals_temperature_one(catalog, models):
    """The same guided step reported at T = 0.5, 1, 2 and 0 (greedy): T = 0 is T = 1, the others differ."""
    guidance = parse_guidance(SPECS["q"], catalog)
    torch.manual_seed(5)
    logits = torch.randn(1, V) * 2
    d = reference_offsets(models, catalog, guidance, [1, 2, 3], logits[0])
    kls = {}
    for t in (0.5, 1.0, 2.0, 0.0):
        batch = GuidanceBatch(models, catalog, max_requests=1, max_len=8)
        output: list[int] = []
        batch.add(0, "k", guidance, [1, 2, 3], output, temperature=t)
        batch.apply(logits.clone())
        output.append(0)
        kls[t] = batch.collect(["k"])["k"].kl
        assert kls[t] == pytest.approx(reference_kl(logits[0], d, t), rel=1e-4, abs=1e-6), t
    assert kls[0.0] == kls[1.0]
    assert len({round(kls[t], 4) for t in (0.5, 1.0, 2.0)}) == 3


def test_bfloat16_guide_models_steer_like_float32(catalog, models):
    """`--guide-dtype bfloat16` (the default on GPUs): offsets computed by bfloat16 guide models stay
    float32 logits, finite, and close to the float32 models' offsets."""
    low = load_guide_models(catalog, dtype=torch.bfloat16, device="cpu")
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    outputs = {}
    for name, guides in (("float32", models), ("bfloat16", low)):
        batch = GuidanceBatch(guides, catalog, max_requests=3, max_len=32)
        for row, spec in enumerate(("q", "hist+cd", "arm+genarm")):
            batch.add(row, f"{name}-{row}", parse_guidance(SPECS[spec], catalog), [1, 5, 9], [], temperature=1.0)
        outputs[name] = batch.apply(logits.clone())
    assert outputs["bfloat16"].dtype == torch.float32 and torch.isfinite(outputs["bfloat16"]).all()
    offsets = {name: out - logits for name, out in outputs.items()}
    scale = offsets["float32"].abs().max()
    assert (offsets["bfloat16"] - offsets["float32"]).abs().max() <= 0.05 * scale + 0.05


def test_entropy_gate_steers_and_scores_only_uncertain_positions(catalog, models):
    """Gated entries add offsets only where the base entropy reaches their bound; the KL stays
    exact, `steps` counts the steered positions, and a V-type head scores only the open rows."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    scored_rows = []
    score_candidates = models["hist"].score_candidates

    def counting(slots, candidates):
        scored_rows.append(len(slots))
        return score_candidates(slots, candidates)

    models["hist"].score_candidates = counting
    engine = FakeEngine(batch, catalog, models, seed=11, spread=True)
    engine.add(0, "gated", "gated", [1, 5, 9], temperature=0.7)
    engine.add(1, "composed", "gated+arm", [1, 7])
    engine.add(2, "ungated", "hist+cd", [1, 3, 3])
    for _ in range(12):
        engine.step()
    reports = batch.collect(["gated", "composed", "ungated"])
    for key, report in reports.items():
        assert report.kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
        assert report.steps == engine.expected_steps[key], key
    assert 0 < reports["gated"].steps < 12 and 0 < reports["composed"].steps < 12  # the gates opened and closed
    assert reports["ungated"].steps == 12
    # hist scores the open steps of "gated" and every step of "ungated", nothing more
    assert sum(scored_rows) == reports["gated"].steps + 12


def test_min_entropy_zero_is_ungated_guidance(catalog, models):
    outcomes = []
    for spec in ("hist+cd", "hist+cd@0"):
        batch = GuidanceBatch(models, catalog, max_requests=2, max_len=64)
        engine = FakeEngine(batch, catalog, models, seed=4, spread=True)
        engine.add(0, "k", spec, [1, 2, 3])
        for _ in range(8):
            engine.step()
        outcomes.append((engine.rows[0]["output"], batch.collect(["k"])["k"]))
    assert outcomes[0] == outcomes[1]
