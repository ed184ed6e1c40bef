"""Exact per-step KL between the guided and the base next-token distributions, and the base entropy.

`kl_guided_to_base` takes dense offsets ``[B, V]``; it is the reference, used where every token may
be steered. When each row's offsets sit on K candidate tokens, `split_at_candidates` reads the
vocabulary once and `CandidateSplit.kl` computes the same KL from ``[B, K]`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Temperatures below this are greedy decoding (vLLM's `_SAMPLING_EPS`): an argmax is sampled,
# not a distribution, so their KL is reported at temperature 1.
GREEDY_TEMPERATURE = 1e-5


def _divisor(temperature: Tensor | None, logits: Tensor) -> Tensor:
    """Each row's temperature as a ``[B, 1]`` divisor of its logits: T, or 1 for greedy rows (or None)."""
    if temperature is None:
        return torch.ones(logits.shape[0], 1, device=logits.device)
    t = temperature.to(device=logits.device, dtype=torch.float32)
    return torch.where(t < GREEDY_TEMPERATURE, torch.ones_like(t), t).unsqueeze(-1)


def kl_guided_to_base(logits: Tensor, offsets: Tensor, temperature: Tensor | None = None) -> Tensor:
    """KL(softmax((l + d) / T) || softmax(l / T)) per row, ``[B, V]`` x ``[B, V]`` x ``[B]`` -> ``[B]``.

    This is the KL between the distributions the engine actually samples from: the offsets d are
    added to the logits l before temperature (vLLM runs logits processors first), so the guided
    policy is softmax((l + d) / T) and the base policy softmax(l / T); top-p / top-k truncation
    comes later and is not included. It is the per-token KL(pi_guided || pi_base) of the Q-sharp
    paper (Zhou et al., 2025), whose response KL is its sum over generated tokens.

    `temperature` ``[B]`` is each row's sampling temperature (None: 1 for every row). A row below
    `GREEDY_TEMPERATURE` (temperature 0, greedy decoding) samples an argmax, not a distribution;
    its KL is taken at temperature 1.
    """
    return guided_logits_and_kl(logits, offsets, temperature)[1]


def guided_logits_and_kl(logits: Tensor, offsets: Tensor, temperature: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The guided logits l + d ``[B, V]`` (float32) and `kl_guided_to_base` of them ``[B]``.

    With l' = l / T, d' = d / T, q = softmax(l' + d') and p = softmax(l'),
    log q - log p = d' - c with c = lse(l' + d') - lse(l'), so KL = E_q[d'] - c. Both log-softmaxes
    come from the same fused kernel, and c is read at one token i where q_i is largest (>= 1/V):
    c = (l'_i + d'_i - log q_i) - (l'_i - log p_i). So d = 0 gives exactly 0 (the two are the same
    computation), no exp over- or underflows, and the vocabulary is read in six passes (the sum
    l + d, two log-softmaxes, an argmax, q = exp(log q), one dot product), where two logsumexps
    alone took eight.
    Tokens with l = -inf have q = 0 and add nothing (d is finite).
    """
    guided = logits.float() + offsets
    if temperature is None:
        base, scaled_guided, scaled_offsets = logits.float(), guided, offsets.float()
    else:
        t = _divisor(temperature, logits)
        base, scaled_guided, scaled_offsets = logits.float() / t, guided / t, offsets.float() / t
    log_q = torch.log_softmax(scaled_guided, dim=-1)
    log_p = torch.log_softmax(base, dim=-1)
    top = log_q.argmax(dim=-1, keepdim=True)
    shift = (scaled_offsets.gather(1, top) - log_q.gather(1, top) + log_p.gather(1, top)).squeeze(1)
    mean_offset = torch.linalg.vecdot(log_q.exp_(), scaled_offsets)
    # Rounding can leave a tiny negative value where q = p.
    return guided, (mean_offset - shift).clamp_min(0.0)


@dataclass(frozen=True)
class CandidateSplit:
    """Each row's base logits at its sampling temperature, l' = l / T, split at K distinct candidate
    tokens C: all that the KL of offsets on C and the base entropy need (see `split_at_candidates`)."""

    outside: Tensor  # [B, V] l', with -inf at the candidates
    at: Tensor  # [B, K] l' at the candidates
    rest_log_norm: Tensor  # [B] logsumexp of l' over the tokens outside C
    divisor: Tensor  # [B, 1] T (1 for greedy rows)

    def kl(self, offsets: Tensor) -> Tensor:
        """`kl_guided_to_base` for offsets d ``[B, K]`` at the candidates (0 at every other token): ``[B]``.

        With d' = d / T and p = softmax(l'): Z = sum_y p_y e^{d'_y} = 1 + sum_c p_c (e^{d'_c} - 1) and
        KL = sum_c p_c e^{d'_c} d'_c / Z - log Z. Computed in log space: log Z = lse(l' + d') - lse(l'),
        each logsumexp the log-sum of the one over the tokens outside C (`rest_log_norm`, shared: d' = 0
        there) and a K-term one, and E_q[d'] = sum_c exp(l'_c + d'_c - lse(l' + d')) d'_c. So no e^{d'}
        overflows at large d', and Z keeps its precision when C holds nearly all of p and d' pushes it
        away (1 - sum_c p_c would cancel). d = 0 gives exactly 0; l = -inf adds nothing (q = 0 there).
        The ``[B, K]`` arithmetic is float64: the KL is a difference of two terms of the size of d', so
        float32 would lose the digits of a small KL (the dense reference loses them; this costs nothing).
        """
        at, rest = self.at.double(), self.rest_log_norm.double()
        d = offsets.double() / self.divisor
        guided = at + d
        log_norm_guided = torch.logaddexp(rest, guided.logsumexp(-1))
        log_norm_base = torch.logaddexp(rest, at.logsumexp(-1))
        mean_offset = ((guided - log_norm_guided.unsqueeze(-1)).exp() * d).sum(-1)
        # Rounding can leave a tiny negative value where q = p.
        return (mean_offset - (log_norm_guided - log_norm_base)).clamp_min(0.0).float()

    def entropy(self) -> Tensor:
        """H(softmax(l')) = -sum_y p(y) log p(y) per row, in nats: ``[B]``."""
        log_norm = torch.logaddexp(self.rest_log_norm, self.at.logsumexp(-1)).unsqueeze(-1)
        outside, at = self.outside - log_norm, self.at - log_norm  # log p
        # p = 0 (log p = -inf: masked tokens, and the candidates in `outside`) adds 0
        return -(outside.exp() * outside).nan_to_num().sum(-1) - (at.exp() * at).nan_to_num().sum(-1)


def split_at_candidates(logits: Tensor, candidates: Tensor, temperature: Tensor | None = None) -> CandidateSplit:
    """Logits ``[B, V]``, K distinct candidate ids per row ``[B, K]`` (K may be 0) and temperatures ``[B]``
    (greedy rows at 1, None: 1) -> their `CandidateSplit`: one pass over the vocabulary (a division and
    one logsumexp), the rest on ``[B, K]``."""
    t = _divisor(temperature, logits)
    scaled = logits.float() / t
    at = scaled.gather(1, candidates)
    outside = scaled.scatter_(1, candidates, float("-inf"))
    return CandidateSplit(outside=outside, at=at, rest_log_norm=outside.logsumexp(-1), divisor=t)


def candidate_mask(logits: Tensor, top_k: Tensor, max_k: int) -> tuple[Tensor, Tensor]:
    """Candidate tokens of each row: the top-k of its base logits.

    logits ``[B, V]``, top_k ``[B]`` (each <= max_k) -> candidate ids ``[B, max_k]`` and a
    validity mask ``[B, max_k]`` (False past a row's own k).
    """
    ids = torch.topk(logits, max_k, dim=-1).indices
    valid = torch.arange(max_k, device=logits.device).unsqueeze(0) < top_k.unsqueeze(1)
    return ids, valid
