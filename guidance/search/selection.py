"""Picking one candidate from its scores: argmax (temperature 0) or softmax(score / temperature);
and, for pruned best-of-N, which live candidates a checkpoint aborts.

Ties at temperature 0 go to the lowest index, so a search with equal scores keeps its
first candidate (best-of-1 is the plain request).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def selection_probabilities(scores: Tensor, temperature: float) -> Tensor:
    """P(pick i) for scores ``[N]``: one-hot on the first maximum at temperature 0, else
    softmax(scores / temperature)."""
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    scores = scores.double()
    if temperature == 0:
        return torch.nn.functional.one_hot(scores.argmax(), scores.numel()).double()
    return torch.softmax(scores / temperature, dim=0)


def select(scores: Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """Index of the chosen candidate; sampling (temperature > 0) draws from `generator`."""
    probabilities = selection_probabilities(scores, temperature)
    if temperature == 0:
        return int(probabilities.argmax())
    return int(torch.multinomial(probabilities, 1, generator=generator))


def selection_generator(seed: int | None, pick: int, round_: int = 0) -> torch.Generator:
    """The generator of one selection: reproducible from the request seed, fresh without one."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(hash((seed, pick, round_)) & ((1 << 63) - 1))
    return generator


def prune_count(live: int, fraction: float, unpruned: int, min_keep: int) -> int:
    """How many of `live` candidates a checkpoint aborts: floor(live * fraction), leaving at least
    `min_keep` of the `unpruned` ones (live or finished); <= 0: none, and no later checkpoint can."""
    return min(int(live * fraction), unpruned - min_keep)


def lowest_scored(live: Sequence[int], scores: Sequence[float], count: int) -> tuple[int, ...]:
    """The `count` lowest-scored of the `live` candidate ids (scores in the same order), lowest first;
    of equal scores the later candidate goes first."""
    ranked = sorted(range(len(live)), key=lambda i: (scores[i], -live[i]))
    return tuple(live[i] for i in ranked[:count])
