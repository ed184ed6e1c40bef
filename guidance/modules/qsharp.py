"""Value-guided decoding in the style of Q-sharp.

pi(y | s) ∝ pi_base(y | s) * E[exp(eta * R) | s, y], so the offset is the
log moment generating function of the predicted return R at eta:

    Bernoulli head, p = sigmoid(x):  d = log(1 - p + p e^eta)
                                       = logaddexp(log sigmoid(-x), log sigmoid(x) + eta)
    Histogram head, atoms z_j:       d = logsumexp_j(log p_j + eta z_j)

Both are 0 at eta = 0 and computed in log space, so large eta cannot overflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from guidance.module import GuidanceModule


def bernoulli_offsets(logits: Tensor, eta: Tensor) -> Tensor:
    """``[B, C]`` Bernoulli logits, ``[B, 1]`` eta -> ``[B, C]`` log E[exp(eta R)]."""
    return torch.logaddexp(F.logsigmoid(-logits), F.logsigmoid(logits) + eta)


def histogram_offsets(atom_logits: Tensor, eta: Tensor, atoms: Tensor) -> Tensor:
    """``[B, C, m]`` atom logits, ``[B, 1]`` eta, ``[m]`` atoms -> ``[B, C]`` log E[exp(eta R)]."""
    log_p = torch.log_softmax(atom_logits, dim=-1)
    return torch.logsumexp(log_p + eta.unsqueeze(-1) * atoms, dim=-1)


class QSharp(GuidanceModule):
    name = "qsharp"
    head_types = ("bernoulli", "histogram")
    default_top_k = 20
    description = "Value-guided decoding: offset log E[exp(strength * R)] under a distributional value model."

    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        if head_type == "histogram":
            d = histogram_offsets(scores, strength, atoms)
        else:
            d = bernoulli_offsets(scores, strength)
        # log(1) rounds to a few ulps in float arithmetic; strength 0 must be exactly unguided.
        return torch.where(strength == 0, torch.zeros_like(d), d)
