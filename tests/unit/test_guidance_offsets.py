"""Every offset formula of DESIGN.md section 3, and the KL, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from guidance.divergence import candidate_mask, kl_guided_to_base
from guidance.modules.arm import ARM
from guidance.modules.cd import ControlledDecoding
from guidance.modules.genarm import GenARM
from guidance.modules.qsharp import QSharp, bernoulli_offsets, histogram_offsets
from models.runtime.heads import expected_reward

ATOMS = torch.tensor([0.0, 0.5, 1.0])


def test_bernoulli_offset_is_log_one_minus_p_plus_p_exp_eta():
    x = torch.tensor([[-2.0, 0.0, 3.0]])
    for eta in (0.5, 2.0, 7.0):
        d = bernoulli_offsets(x, torch.tensor([[eta]]))
        for j, logit in enumerate(x[0].tolist()):
            p = 1 / (1 + math.exp(-logit))
            assert d[0, j].item() == pytest.approx(math.log(1 - p + p * math.exp(eta)), rel=1e-5)


def test_histogram_offset_is_log_mgf():
    atom_logits = torch.tensor([[[0.1, 1.0, -0.5], [2.0, 0.0, 0.0]]])
    eta = 3.0
    d = histogram_offsets(atom_logits, torch.tensor([[eta]]), ATOMS)
    for c in range(2):
        p = torch.softmax(atom_logits[0, c].double(), -1)
        expected = math.log(sum(pj * math.exp(eta * z) for pj, z in zip(p.tolist(), ATOMS.tolist())))
        assert d[0, c].item() == pytest.approx(expected, rel=1e-5)


def test_qsharp_large_strength_stays_finite_and_approaches_log_p_plus_eta():
    x = torch.tensor([[-3.0, 1.0]])
    d = QSharp().offsets(x, torch.tensor([[1000.0]]), "bernoulli", None)
    assert torch.isfinite(d).all()
    # For large eta, log(1 - p + p e^eta) -> log p + eta.
    assert torch.allclose(d, torch.nn.functional.logsigmoid(x) + 1000.0)


@pytest.mark.parametrize("head", ["bernoulli", "histogram"])
def test_qsharp_strength_zero_is_exactly_zero(head):
    scores = torch.randn(3, 5) if head == "bernoulli" else torch.randn(3, 5, 3)
    strength = torch.tensor([[0.0], [1.5], [0.0]])
    d = QSharp().offsets(scores, strength, head, ATOMS)
    assert torch.equal(d[0], torch.zeros(5)) and torch.equal(d[2], torch.zeros(5))
    assert (d[1] != 0).any()


def test_qsharp_is_monotone_in_value():
    # A token with a higher success probability gets a higher offset.
    d = QSharp().offsets(torch.tensor([[-1.0, 0.0, 1.0]]), torch.tensor([[2.0]]), "bernoulli", None)
    assert d[0, 0] < d[0, 1] < d[0, 2]


def test_cd_offset_is_strength_times_expected_value():
    cd = ControlledDecoding()
    scores = torch.tensor([[0.2, -0.4]])
    assert torch.allclose(cd.offsets(scores, torch.tensor([[2.0]]), "expected", None), 2.0 * scores)
    assert torch.allclose(cd.offsets(scores, torch.tensor([[2.0]]), "bernoulli", None), 2.0 * torch.sigmoid(scores))
    atom_logits = torch.tensor([[[0.0, 0.0, 0.0]]])  # uniform over {0, .5, 1}: mean 0.5
    assert expected_reward(atom_logits, "histogram", ATOMS).item() == pytest.approx(0.5)
    assert torch.equal(cd.offsets(scores, torch.tensor([[0.0]]), "expected", None), torch.zeros(1, 2))


def test_arm_offset_is_beta_times_reward():
    r = torch.tensor([[1.0, -2.0, 0.5]])
    assert torch.allclose(ARM().offsets(r, torch.tensor([[0.5]]), "arm", None), 0.5 * r)


def test_genarm_offset_is_alpha_log_pi_r():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    module = GenARM()
    scores = module.token_scores(logits)
    assert torch.allclose(scores.exp().sum(-1), torch.ones(1))
    d = module.offsets(scores, torch.tensor([[2.0]]), "lm", None)
    assert torch.allclose(d, 2.0 * torch.log_softmax(logits, -1))


def _kl_reference(logits, offsets, temperature=1.0):
    """KL(softmax((l + d) / T) || softmax(l / T)) of one row, straight from the definition."""
    p = torch.softmax(logits.double() / temperature, -1)
    q = torch.softmax((logits + offsets).double() / temperature, -1)
    mask = q > 0
    return (q[mask] * (q[mask].log() - p[mask].log())).sum()


def test_kl_matches_definition():
    torch.manual_seed(0)
    logits, offsets = torch.randn(4, 50), torch.randn(4, 50) * 2
    kl = kl_guided_to_base(logits, offsets)
    for row in range(4):
        assert kl[row].item() == pytest.approx(_kl_reference(logits[row], offsets[row]).item(), rel=1e-4, abs=1e-6)


def test_kl_zero_without_offsets_and_with_constant_offsets():
    logits = torch.randn(2, 10)
    assert torch.equal(kl_guided_to_base(logits, torch.zeros(2, 10)), torch.zeros(2))
    assert kl_guided_to_base(logits, torch.full((2, 10), 3.0)).abs().max() < 1e-5  # a shift is no change


def test_kl_with_masked_tokens():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    offsets = torch.tensor([[1.0, 5.0, 0.0]])
    kl = kl_guided_to_base(logits, offsets)
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(_kl_reference(logits[0], offsets[0]).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_kl_at_temperature_is_between_the_sampled_distributions(temperature):
    """Offsets are added before temperature: the KL is KL(softmax((l + d) / T) || softmax(l / T))."""
    torch.manual_seed(1)
    logits, offsets = torch.randn(3, 40) * 2, torch.randn(3, 40) * 2
    kl = kl_guided_to_base(logits, offsets, torch.full((3,), temperature))
    at_one = kl_guided_to_base(logits, offsets)
    for row in range(3):
        expected = _kl_reference(logits[row], offsets[row], temperature).item()
        assert kl[row].item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert abs(expected - at_one[row].item()) > 1e-2  # the temperature matters here


def test_kl_temperature_matches_scaling_logits_by_hand():
    torch.manual_seed(2)
    logits, offsets = torch.randn(2, 30), torch.randn(2, 30)
    for t in (0.5, 2.0):
        scaled = kl_guided_to_base(logits / t, offsets / t)
        assert torch.allclose(kl_guided_to_base(logits, offsets, torch.full((2,), t)), scaled, rtol=1e-5, atol=1e-7)


def test_greedy_rows_report_kl_at_temperature_one():
    """Temperature below vLLM's sampling epsilon (1e-5) is greedy: an argmax, reported at T = 1."""
    torch.manual_seed(3)
    logits, offsets = torch.randn(3, 20), torch.randn(3, 20) * 3
    greedy = kl_guided_to_base(logits, offsets, torch.tensor([0.0, 1e-6, 0.0]))
    assert torch.equal(greedy, kl_guided_to_base(logits, offsets, torch.ones(3)))
    for row in range(3):
        assert greedy[row].item() == pytest.approx(_kl_reference(logits[row], offsets[row], 1.0).item(), rel=1e-4)


def test_rows_with_different_temperatures_in_one_batch():
    torch.manual_seed(4)
    temperatures = [0.5, 2.0, 0.0, 1.0, 0.01]
    logits, offsets = torch.randn(5, 25) * 2, torch.randn(5, 25)
    kl = kl_guided_to_base(logits, offsets, torch.tensor(temperatures))
    for row, t in enumerate(temperatures):
        expected = _kl_reference(logits[row], offsets[row], t if t > 0 else 1.0).item()
        assert kl[row].item() == pytest.approx(expected, rel=1e-3, abs=1e-5), (row, t)


@pytest.mark.parametrize("temperature", [0.0, 0.3, 1.0, 2.0])
def test_kl_exactly_zero_without_offsets_at_any_temperature(temperature):
    logits = torch.randn(3, 12)
    logits[0, 4] = float("-inf")
    kl = kl_guided_to_base(logits, torch.zeros(3, 12), torch.full((3,), temperature))
    assert torch.equal(kl, torch.zeros(3))


def test_kl_at_temperature_with_masked_tokens():
    logits = torch.tensor([[0.0, float("-inf"), 1.0]])
    offsets = torch.tensor([[1.0, 5.0, 0.0]])
    kl = kl_guided_to_base(logits, offsets, torch.tensor([0.5]))
    assert torch.isfinite(kl).all()
    assert kl.item() == pytest.approx(_kl_reference(logits[0], offsets[0], 0.5).item(), rel=1e-5)


def test_candidate_mask_takes_each_rows_top_k():
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    ids, valid = candidate_mask(logits, torch.tensor([2, 3]), 3)
    assert ids.tolist() == [[1, 2, 3], [0, 1, 2]]
    assert valid.tolist() == [[True, True, False], [True, True, True]]
