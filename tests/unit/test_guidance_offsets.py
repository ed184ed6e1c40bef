"""Every offset formula of DESIGN.md section 3, and the KL, on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from guidance.divergence import candidate_mask, kl_guided_to_base, split_at_candidates
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


def _on_vocabulary(candidates, offsets, vocab):
    """Offsets at candidate ids ``[B, K]`` written into dense offsets ``[B, V]`` (repeated ids add up)."""
    return torch.zeros(candidates.shape[0], vocab, dtype=offsets.dtype).scatter_add_(1, candidates, offsets)


@pytest.mark.parametrize("temperature", [0.0, 1e-6, 0.3, 1.0, 2.5])
def test_sparse_kl_equals_the_dense_reference(temperature):
    """Rows: plain, -inf logits inside and outside the candidates, every non-candidate masked, and unsteered."""
    torch.manual_seed(10)
    logits = torch.randn(5, 60) * 3
    candidates = torch.topk(logits, 6).indices
    offsets = torch.randn(5, 6) * 2
    logits[1, candidates[1, 2]] = float("-inf")
    logits[1, :3] = float("-inf")
    logits[2] = float("-inf")
    logits[2, candidates[2]] = torch.randn(6)
    offsets[3] = 0.0
    t = torch.full((5,), temperature)
    kl = split_at_candidates(logits, candidates, t).kl(offsets)
    dense = kl_guided_to_base(logits, _on_vocabulary(candidates, offsets, 60), t)
    torch.testing.assert_close(kl, dense, rtol=1e-4, atol=1e-5)  # the dense reference's own float32 rounding
    assert kl[3] == 0.0 and torch.isfinite(kl).all()
    for row in range(5):
        expected = _kl_reference(logits[row], _on_vocabulary(candidates, offsets, 60)[row],
                                 temperature if temperature >= 1e-5 else 1.0).item()
        assert kl[row].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), row


def test_sparse_kl_with_one_candidate_any_candidate_set_and_none():
    torch.manual_seed(11)
    logits = torch.randn(4, 40)
    t = torch.tensor([0.7, 1.0, 0.0, 2.0])
    top1 = torch.topk(logits, 1).indices
    d1 = torch.tensor([[1.5], [-2.0], [0.0], [4.0]])
    torch.testing.assert_close(split_at_candidates(logits, top1, t).kl(d1),
                               kl_guided_to_base(logits, _on_vocabulary(top1, d1, 40), t), rtol=1e-4, atol=1e-6)
    anywhere = torch.stack([torch.randperm(40)[:7] for _ in range(4)])  # not the top-k: any distinct ids
    d = torch.randn(4, 7)
    torch.testing.assert_close(split_at_candidates(logits, anywhere, t).kl(d),
                               kl_guided_to_base(logits, _on_vocabulary(anywhere, d, 40), t), rtol=1e-4, atol=1e-6)
    nothing = torch.zeros(4, 0, dtype=torch.long)
    assert torch.equal(split_at_candidates(logits, nothing, t).kl(torch.zeros(4, 0)), torch.zeros(4))


def test_sparse_kl_sums_offsets_of_several_entries_on_the_same_tokens():
    """Two entries steer the top 3 and the top 5 of a row: on the grid of its top-5 their offsets add up
    per column, the same as two dense offsets added up (the KL is not the sum of the two entries' KLs)."""
    torch.manual_seed(12)
    logits = torch.randn(3, 50) * 2
    top = torch.topk(logits, 5).indices
    first, second = torch.randn(3, 3) * 2, torch.randn(3, 5) * 2
    grid = torch.zeros(3, 5)
    grid[:, :3] += first
    grid[:, :5] += second
    t = torch.tensor([1.0, 0.5, 0.0])
    dense = _on_vocabulary(top[:, :3], first, 50) + _on_vocabulary(top, second, 50)
    kl = split_at_candidates(logits, top, t).kl(grid)
    torch.testing.assert_close(kl, kl_guided_to_base(logits, dense, t), rtol=1e-4, atol=1e-6)
    separately = (split_at_candidates(logits, top[:, :3], t).kl(first) + split_at_candidates(logits, top, t).kl(second))
    assert (kl - separately).abs().max() > 1e-2


@pytest.mark.parametrize("offsets", [[0.0, 500.0, 1.0, -2.0], [-60.0, -60.0, -60.0, -60.0]])
def test_sparse_kl_stays_exact_where_its_plain_formula_breaks(offsets):
    """On a peaked row whose 4 candidates hold all but ~1e-9 of p: +500 overflows e^{d'} in
    Z = 1 + sum_c p_c (e^{d'_c} - 1); -60 on every candidate leaves that Z to cancellation."""
    logits = torch.zeros(2, 30)
    logits[:, :4] = torch.tensor([25.0, 24.0, 23.5, 22.0])
    candidates = torch.arange(4).expand(2, 4)
    d = torch.tensor(offsets).expand(2, 4)
    t = torch.tensor([1.0, 0.8])
    kl = split_at_candidates(logits, candidates, t).kl(d)
    p = torch.softmax(logits / t[:, None], -1)[:, :4]
    z = 1 + (p * torch.expm1(d / t[:, None])).sum(-1)
    plain = (p * torch.exp(d / t[:, None]) * d / t[:, None]).sum(-1) / z - z.log()
    for row in range(2):
        expected = _kl_reference(logits[row], _on_vocabulary(candidates, d, 30)[row], t[row].item()).item()
        assert expected > 0.1
        assert kl[row].item() == pytest.approx(expected, rel=1e-4), row
        assert not plain[row].item() == pytest.approx(expected, rel=1e-2), row


@pytest.mark.parametrize("temperature", [0.0, 0.5, 1.0, 3.0])
def test_entropy_of_a_split_is_the_base_entropy(temperature):
    torch.manual_seed(13)
    logits = torch.randn(3, 40) * 2
    logits[0, 5] = float("-inf")
    candidates = torch.topk(logits, 4).indices
    logits[1, candidates[1, 0]] = float("-inf")
    entropy = split_at_candidates(logits, candidates, torch.full((3,), temperature)).entropy()
    t = temperature if temperature >= 1e-5 else 1.0
    for row in range(3):
        p = torch.softmax(logits[row].double() / t, -1)
        expected = -(p[p > 0] * p[p > 0].log()).sum().item()
        assert entropy[row].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), row
