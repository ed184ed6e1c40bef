"""Exact per-step KL between the guided and the base next-token distributions."""

from __future__ import annotations

import torch
from torch import Tensor


def kl_guided_to_base(logits: Tensor, offsets: Tensor) -> Tensor:
    """KL(softmax(l + d) || softmax(l)) per row, ``[B, V]`` x ``[B, V]`` -> ``[B]``.

    With q = softmax(l + d) and p = softmax(l), log q - log p = d - (lse(l + d) - lse(l)), so
    KL = E_q[d] - lse(l + d) + lse(l). Tokens with l = -inf have q = 0 and add nothing.
    """
    logits = logits.float()
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
