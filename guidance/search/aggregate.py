"""One score for a completion from its step scores (a process reward model's, or a prefix scorer's).

    last  r_K                 the score after the last step (a PRM's estimate for the whole solution)
    min   min_k r_k           the weakest step (a solution is as good as its worst step)
    prod  prod_k r_k          the chance that every step is right, reading r_k as independent probabilities
    mean  (1/K) sum_k r_k

Pure: best-of-N, beam search and the other step-level searches share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

Aggregate = Literal["last", "min", "prod", "mean"]
AGGREGATES: tuple[str, ...] = get_args(Aggregate)


def aggregate(step_scores: Sequence[float], how: str) -> float:
    """The `how` aggregate of one completion's step scores (at least one); ValueError naming a bad `how`."""
    if not step_scores:
        raise ValueError("no step scores to aggregate")
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    if how == "mean":
        return math.fsum(step_scores) / len(step_scores)
    raise ValueError(f"unknown aggregate {how!r}; one of {', '.join(AGGREGATES)}")
