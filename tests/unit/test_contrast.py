"""The `contrast` module: s * (log pi_expert - log pi_reference) against float64 references from the
definition, its validation naming the field, the batch runtime (joins, moves, temperatures, top-k,
entropy gate, KL budget), and plain causal-LM checkpoints as lm guides."""

from __future__ import annotations

import json

import pytest
import torch

from guidance.batch import GuidanceBatch
from guidance.catalog import GuideCatalog, GuideModelInfo, read_guide_info
from guidance.errors import GuidanceError
from guidance.modules.contrast import Contrast
from guidance.registry import get_module
from guidance.spec import parse_guidance
from tests.guidance_batch_reference import (  # noqa: F401  (catalog, models: fixtures)
    PLAIN_LM, V, FakeEngine, catalog, full_recompute_log_probs, models)
from tests.unit.test_guidance_spec import CATALOG as SPEC_CATALOG
from tests.unit.test_kl_budget import exact_kl, reference_step

CATALOG = GuideCatalog({**{name: SPEC_CATALOG[name] for name in SPEC_CATALOG.names()},
                        "rlm-ref": GuideModelInfo("rlm-ref", SPEC_CATALOG["rlm"].path, "lm", "q", 100)})
ENTRY = {"type": "contrast", "model": "rlm", "reference": "rlm-ref", "strength": 1.5}


def contrast_offsets(expert_logits: torch.Tensor, reference_logits: torch.Tensor, strength: torch.Tensor):
    """The module's offsets of an entry: the sum over its two terms, each at its weight times the strength."""
    module = Contrast()
    return sum(module.offsets(module.token_scores(logits), term.weight * strength, "lm", None)
               for term, logits in zip(module.terms(parse_guidance([ENTRY], CATALOG)[0].params),
                                       (expert_logits, reference_logits)))


def test_offsets_are_strength_times_the_log_probability_ratio_in_float64():
    torch.manual_seed(0)
    expert, reference = torch.randn(3, 50) * 4, torch.randn(3, 50) * 4
    strength = torch.tensor([[1.0], [0.3], [2.5]])
    expected = strength.double() * (torch.log_softmax(expert.double(), -1) - torch.log_softmax(reference.double(), -1))
    assert torch.allclose(contrast_offsets(expert, reference, strength).double(), expected, atol=1e-5)


def test_offsets_are_zero_at_strength_zero_and_for_one_model_against_itself():
    logits = torch.randn(2, 40) * 5
    assert torch.equal(contrast_offsets(logits, torch.randn(2, 40), torch.zeros(2, 1)), torch.zeros(2, 40))
    assert torch.equal(contrast_offsets(logits, logits, torch.full((2, 1), 3.0)), torch.zeros(2, 40))


def test_an_entry_reads_the_expert_at_weight_one_and_the_reference_at_minus_one():
    [entry] = parse_guidance([ENTRY], CATALOG)
    assert [(t.field, t.model, t.weight) for t in entry.terms] == [
        ("model", "rlm", 1.0), ("reference", "rlm-ref", -1.0)]
    assert entry.models == ("rlm", "rlm-ref")
    assert entry.describe() == {"type": "contrast", "model": "rlm", "reference": "rlm-ref", "strength": 1.5,
                                "top_k": -1, "min_entropy": 0.0}
    assert get_module("contrast").uses_reward_scale is False


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"reference": None}, "guidance[0].reference", "Missing"),
        ({"reference": "nope"}, "guidance[0].reference", "Unknown guide model 'nope'"),
        ({"reference": "value"}, "guidance[0].reference", "'bernoulli' head"),
        ({"reference": "rlm"}, "guidance[0].reference", "another guide model"),
        ({"reference": ""}, "guidance[0].reference", "at least 1 character"),
        ({"reference": 3}, "guidance[0].reference", "string"),
        ({"model": "arm"}, "guidance[0].model", "'arm' head"),
        ({"model": "nope"}, "guidance[0].model", "Unknown guide model 'nope'"),
        ({"strength": -1.0}, "guidance[0].strength", "greater than or equal to 0"),
        ({"expert": "rlm"}, "guidance[0].expert", "Unrecognized"),
        ({"top_k": 0}, "guidance[0].top_k", "top_k"),
    ],
)
def test_bad_entries_name_the_field(change, param, words):
    entry = {k: v for k, v in {**ENTRY, **change}.items() if v is not None}
    with pytest.raises(GuidanceError) as info:
        parse_guidance([entry], CATALOG)
    assert info.value.param == param
    assert words in info.value.message


def test_a_plain_causal_lm_checkpoint_is_an_lm_guide(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50, "architectures": ["LlamaForCausalLM"]}))
    info = read_guide_info("plain", tmp_path)
    assert (info.head_type, info.scoring, info.vocab_size) == ("lm", "q", 50)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 50, "architectures": ["LlamaModel"]}))
    with pytest.raises(ValueError, match="no causal-LM architecture"):
        read_guide_info("headless", tmp_path)


def test_the_plain_checkpoint_scores_its_own_lm_head(catalog, models):
    from transformers import LlamaForCausalLM

    assert (catalog[PLAIN_LM].head_type, catalog[PLAIN_LM].scoring) == ("lm", "q")
    tokens = [1, 5, 9, 3]
    reference = LlamaForCausalLM.from_pretrained(catalog[PLAIN_LM].path, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([tokens])).logits[0, -1], -1)
    assert torch.allclose(full_recompute_log_probs(models[PLAIN_LM], tokens), expected, atol=1e-5)


def test_one_whole_vocabulary_row_matches_the_float64_definition(catalog, models):
    """Offsets and KL of a contrast row after a prompt and two generated tokens, at temperature 0.7."""
    [entry] = guidance = parse_guidance([{"type": "contrast", "model": "rlm", "reference": PLAIN_LM,
                                          "strength": 1.5}], catalog)
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    prompt, output = [1, 4, 7], []
    batch.add(0, "k", guidance, prompt, output, temperature=0.7)
    generator = torch.Generator().manual_seed(4)
    expected_kl = 0.0
    for _ in range(3):
        logits = torch.randn(1, V, generator=generator) * 2
        tokens = prompt + output
        d = 1.5 * (full_recompute_log_probs(models["rlm"], tokens) - full_recompute_log_probs(models[PLAIN_LM], tokens))
        out = batch.apply(logits.clone())
        assert torch.allclose((out[0] - logits[0]).double(), d, atol=2e-5)
        expected_kl += exact_kl(logits[0], d, 0.7)
        output.append(int(out[0].argmax()))
    report = batch.collect(["k"])["k"]
    assert report.kl > 0 and report.steps == 3
    assert report.kl == pytest.approx(expected_kl, rel=1e-4)
    assert entry.models == ("rlm", PLAIN_LM)


def test_rows_join_leave_move_and_match_full_recompute(catalog, models):
    """Contrast rows (whole vocabulary; top-k with a genarm entry on the same model; entropy-gated) next to
    other modules, through joins, a swap, a condensing move and temperatures 1, 0.5, 2 and 0."""
    batch = GuidanceBatch(models, catalog, max_requests=4, max_len=64)
    engine = FakeEngine(batch, catalog, models, seed=21, spread=True)
    engine.add(0, "whole", "contrast", [1, 5, 9])
    engine.add(1, "sparse", "contrast top_k+genarm", [1, 7], temperature=0.5)
    engine.add(2, "gated", "contrast gated", [1, 3, 3], temperature=2.0)
    engine.step()
    engine.step()
    engine.move(2, 0, swap=True)
    engine.step()
    engine.remove(1)
    engine.move(2, 1, swap=False)
    engine.add(2, "arm", "arm+genarm", [1, 2], temperature=0.0)
    engine.step()
    engine.step()
    keys = ["whole", "sparse", "gated", "arm"]
    reports = batch.collect(keys)
    for key in keys:
        assert reports[key].kl == pytest.approx(engine.expected_kl[key], rel=1e-4, abs=1e-6), key
        assert reports[key].steps == engine.expected_steps[key], key
    assert reports["whole"].kl > 0 and reports["sparse"].kl > 0
    assert 0 < engine.expected_steps["gated"] < 5  # the gate opened at some positions only


def test_the_reward_scale_of_an_lm_head_does_not_apply(catalog, models):
    """A GenARM reward LM's reward_scale multiplies its genarm offsets, not its log-probabilities in a contrast."""
    models["rlm"].head.reward_scale = 3.0
    guidance = parse_guidance([{"type": "contrast", "model": "rlm", "reference": PLAIN_LM, "strength": 1.0}], catalog)
    batch = GuidanceBatch(models, catalog, max_requests=1, max_len=16)
    batch.add(0, "s", guidance, [1, 2], [])
    logits = torch.randn(1, V)
    out = batch.apply(logits.clone())
    d = full_recompute_log_probs(models["rlm"], [1, 2]) - full_recompute_log_probs(models[PLAIN_LM], [1, 2])
    assert torch.allclose((out[0] - logits[0]).double(), d, atol=2e-5)


def test_a_budgeted_contrast_steers_with_the_largest_fitting_strength(catalog, models):
    """max_kl 0.5 and kl_per_token 0.2 at temperature 1.3: each step's logits are the float64 bisection's,
    what the batch spends fits the allowance, and the report stays within the budget."""
    guidance = parse_guidance([{"type": "contrast", "model": PLAIN_LM, "reference": "rlm", "strength": 4.0,
                                "max_kl": 0.5, "kl_per_token": 0.2}], catalog)
    batch = GuidanceBatch(models, catalog, max_requests=2, max_len=32)
    prompt, output = [1, 6], []
    batch.add(1, "b", guidance, prompt, output, temperature=1.3)
    generator = torch.Generator().manual_seed(9)
    spent, scales = 0.0, []
    for _ in range(6):
        logits = torch.randn(2, V, generator=generator)
        out = batch.apply(logits.clone())
        allowed = max(min(0.2, 0.5 - spent), 0.0)
        scale, d, kl = reference_step(models, catalog, guidance, prompt + output, logits[1], 1.3, allowed)
        assert exact_kl(logits[1], out[1] - logits[1], 1.3) <= allowed + 2e-6
        if allowed > 1e-4:
            assert torch.allclose(out[1], logits[1] + d, atol=2e-4)
        assert torch.equal(out[0], logits[0])  # the unguided row is untouched
        spent += kl
        scales.append(scale)
        output.append(int(out[1].argmax()))
    report = batch.collect(["b"])["b"]
    assert report.kl == pytest.approx(spent, rel=1e-4, abs=1e-5)
    assert report.kl <= 0.5 * (1 + 1e-5)
    assert min(scales) < 1 and report.scale[2] == pytest.approx(max(scales), abs=1e-4)


def test_strength_zero_runs_nothing(catalog, models):
    guidance = parse_guidance([{"type": "contrast", "model": "rlm", "reference": PLAIN_LM, "strength": 0.0}], catalog)
    batch = GuidanceBatch(models, catalog, max_requests=1, max_len=16)
    batch.add(0, "z", guidance, [1, 2], [])
    assert batch.num_guided == 0
    assert models["rlm"].cache.num_free == 1 and models[PLAIN_LM].cache.num_free == 1
    logits = torch.randn(1, V)
    assert torch.equal(batch.apply(logits.clone()), logits)
