"""How the per-step scores of a process reward model (or of a prefix scorer read at each step) make
one score for a partial or finished solution, as search-and-learn aggregates PRM scores:

- ``last``: the newest step's score (a PRM's estimate that the solution so far is on track);
- ``min``: the weakest step;
- ``prod``: the product of the steps' scores (the chance every step is right, when each is a probability);
- ``mean``: their average.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

Aggregate = Literal["last", "min", "prod", "mean"]
AGGREGATES: tuple[Aggregate, ...] = ("last", "min", "prod", "mean")


def aggregate(step_scores: Sequence[float], how: Aggregate) -> float:
    """One score from the scores of a solution's steps, in order (at least one)."""
    if not step_scores:
        raise ValueError("aggregate needs at least one step score")
    if how == "last":
        return float(step_scores[-1])
    if how == "min":
        return float(min(step_scores))
    if how == "prod":
        return float(math.prod(step_scores))
    if how == "mean":
        return float(sum(step_scores) / len(step_scores))
    raise ValueError(f"unknown aggregate {how!r}; one of {', '.join(AGGREGATES)}")
