"""Exact per-step KL between the guided and the base next-token distributions."""

from __future__ import annotations

import torch
from torch import Tensor

# Temperatures below this are greedy decoding (vLLM's `_SAMPLING_EPS`): an argmax is sampled,
# not a distribution, so their KL is reported at temperature 1.
GREEDY_TEMPERATURE = 1e-5


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

    With l' = l / T, d' = d / T, q = softmax(l' + d') and p = softmax(l'),
    log q - log p = d' - (lse(l' + d') - lse(l')), so KL = E_q[d'] - lse(l' + d') + lse(l').
    Tokens with l = -inf have q = 0 and add nothing; d = 0 gives exactly 0.
    """
    logits = logits.float()
    offsets = offsets.float()
    if temperature is not None:
        t = temperature.to(device=logits.device, dtype=logits.dtype)
        t = torch.where(t < GREEDY_TEMPERATURE, torch.ones_like(t), t).unsqueeze(-1)  # [B, 1]
        logits = logits / t
        offsets = offsets / t
    guided = logits + offsets
    log_norm_shift = torch.logsumexp(guided, dim=-1) - torch.logsumexp(logits, dim=-1)
    q = torch.softmax(guided, dim=-1)
    mean_offset = (q * offsets.masked_fill(q == 0, 0.0)).sum(dim=-1)
    # Rounding can leave a tiny negative value where q = p.
    return (mean_offset - log_norm_shift).clamp_min(0.0)


def candidate_mask(logits: Tensor, top_k: Tensor, max_k: int) -> tuple[Tensor, Tensor]:
    """Candidate tokens of each row: the top-k of its base logits.

    logits ``[B, V]``, top_k ``[B]`` (each <= max_k) -> candidate ids ``[B, max_k]`` and a
    validity mask ``[B, max_k]`` (False past a row's own k).
    """
    ids = torch.topk(logits, max_k, dim=-1).indices
    valid = torch.arange(max_k, device=logits.device).unsqueeze(0) < top_k.unsqueeze(1)
    return ids, valid
