"""Autoregressive reward-model head: offset beta * r(s, y).

r(s, y) = e_y . (W h_s) + b . h_s comes for every y from one forward of the
prefix (a low-rank head over the tied output embeddings, `models.runtime.heads.ARMHead`).
"""

from __future__ import annotations

from torch import Tensor

from guidance.module import GuidanceModule


class ARM(GuidanceModule):
    name = "arm"
    head_types = ("arm",)
    description = "Autoregressive reward head: offset strength * r(s, y) for all y from one forward."

    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        return strength * scores
