"""The interface every guidance module implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from guidance.params import GuidanceParams

WHOLE_VOCABULARY = -1


@dataclass(frozen=True)
class GuideTerm:
    """One guide model an entry reads: the entry's field that names it, the model, and the weight w of
    its offset: the entry's offset is the sum over its terms of the module's offsets at strength w * s."""

    field: str
    model: str
    weight: float = 1.0


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
    uses_reward_scale: ClassVar[bool] = True
    """Whether a token-reward head's `reward_scale` multiplies its scores (rewards served at unit spread);
    False for a module that reads an lm head's log-probabilities as they are."""

    def terms(self, params: GuidanceParams) -> tuple[GuideTerm, ...]:
        """The guide models an entry reads (one, named by `model`, unless the module needs more)."""
        return (GuideTerm("model", params.model),)

    def token_scores(self, head_output: Tensor) -> Tensor:
        """Q-type heads: normalise the scores of the whole vocabulary ``[B, V(, m)]``
        before candidates are picked (identity unless the module needs it)."""
        return head_output

    @abstractmethod
    def offsets(self, scores: Tensor, strength: Tensor, head_type: str, atoms: Tensor | None) -> Tensor:
        """Offsets ``[B, C]`` from candidate scores ``[B, C]`` (``[B, C, m]`` for histogram
        heads with atoms ``[m]``) and per-row strengths ``[B, 1]`` (each a term's weight times the
        entry's strength: negative for a term the entry subtracts).

        Must give exactly 0 where the strength is 0.
        """
