"""Token-wise controlled decoding (CD-FUDGE): offset lambda * V(s, y).

V is the prefix scorer's predicted expected reward of s followed by y:
the `expected` head's output, sigmoid of a `bernoulli` logit, or the mean
sum_j p_j z_j of a `histogram` head.
"""

from __future__ import annotations

from torch import Tensor

from guidance.module import GuidanceModule
from models.runtime.heads import expected_reward


class ControlledDecoding(GuidanceModule):
    name = "cd"
    head_types = ("expected", "bernoulli", "histogram")
    default_top_k = 20
    description = "Controlled decoding (CD-FUDGE): offset strength * V(s, y) from a prefix scorer."

    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        return strength * expected_reward(scores, head_type, atoms)  # V(s, y) [B, C]
