"""The interface every guidance module implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from guidance.params import GuidanceParams

WHOLE_VOCABULARY = -1


class GuidanceModule(ABC):
    """Turns guide-model scores of candidate tokens into logit offsets d(s, y).

    A module is stateless: the batch runtime feeds the guide model and hands the
    module the scores of the candidate tokens C of each guided row.
    """

    name: ClassVar[str]
    params_class: ClassVar[type[GuidanceParams]] = GuidanceParams
    head_types: ClassVar[tuple[str, ...]]
    """Guide-head types (see `models.runtime.heads`) this module can use."""
    default_top_k: ClassVar[int] = WHOLE_VOCABULARY
    normalises_over_vocabulary: ClassVar[bool] = False
    """True when `token_scores` reads every token's score (a softmax): a Q-type head must then score the
    whole vocabulary even for k candidates; otherwise only the candidates are scored."""
    description: ClassVar[str] = ""

    def token_scores(self, head_output: Tensor) -> Tensor:
        """Q-type heads: normalise the scores of the whole vocabulary ``[B, V(, m)]``
        before candidates are picked (identity unless the module needs it)."""
        return head_output

    @abstractmethod
    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        """Offsets ``[B, C]`` from candidate scores ``[B, C]`` (``[B, C, m]`` for histogram
        heads with atoms ``[m]``) and per-row strengths ``[B, 1]``.

        Must give exactly 0 where the strength is 0.
        """
