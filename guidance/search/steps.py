"""The pure parts of step-level search: where a step ends, which partial solutions a step keeps, how
particles are resampled, which finished solution answers, and how much of the search is decided.

Beam search and DVTS follow HF's search-and-learn (Beeching et al. 2024, "Scaling test-time compute
with open models"); particle filtering follows its_hub (Puri et al. 2025, arXiv 2502.01618): weights
softmax(logit(score)), resampled with replacement at every step, finished particles included with
their last weight, and the answer is the particle of highest weight.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import torch

LOGIT_CLIP = 1e-7  # scores are clipped to [1e-7, 1 - 1e-7] before logit, as its_hub does


def step_end(decode: Callable[[Sequence[int]], str], token_ids: Sequence[int], delimiter: str,
             checked: int = 0) -> int | None:
    """The number of a step's leading tokens whose text first holds `delimiter` (the step ends with the
    token that completes it, even when the delimiter is split across tokens); None when the text has
    none. `checked`: leading tokens already known to hold none."""
    if delimiter not in decode(token_ids):
        return None
    for end in range(max(checked, 0) + 1, len(token_ids) + 1):
        if delimiter in decode(token_ids[:end]):
            return end
    return len(token_ids)


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indexes of the `k` highest scores, best first; of equal scores the earlier index ranks first."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def particle_weights(scores: Sequence[float], temperature: float, weighting: str = "logit") -> torch.Tensor:
    """Resampling probabilities softmax(w / temperature), with w = logit(score) (scores clipped to
    [1e-7, 1 - 1e-7]) or w = score."""
    values = torch.tensor([float(s) for s in scores], dtype=torch.float64)
    if weighting == "logit":
        values = torch.logit(values.clamp(LOGIT_CLIP, 1 - LOGIT_CLIP))
    elif weighting != "score":
        raise ValueError(f"weighting must be 'logit' or 'score', got {weighting!r}")
    return torch.softmax(values / temperature, dim=0)


def resample(probabilities: torch.Tensor, count: int, generator: torch.Generator) -> list[int]:
    """`count` indexes drawn with replacement from `probabilities` (multinomial resampling)."""
    return torch.multinomial(probabilities, count, replacement=True, generator=generator).tolist()


def weighted_majority(answers: Sequence[Hashable | None], scores: Sequence[float]) -> int | None:
    """The best-scored solution among those giving the answer whose scores sum highest (ties: the answer
    found first); None when no solution gives an answer."""
    totals: dict[Hashable, float] = defaultdict(float)
    for answer, score in zip(answers, scores):
        if answer is not None:
            totals[answer] += score
    if not totals:
        return None
    best = max(totals, key=lambda a: (totals[a], -answers.index(a)))
    return max((i for i, a in enumerate(answers) if a == best), key=lambda i: (scores[i], -i))


def shared_steps(lineages: Sequence[Sequence[int]]) -> int:
    """How many leading steps every lineage (a solution's step ids, root first) has in common: the part
    of the search that no later step can change."""
    if not lineages:
        return 0
    shortest = min(len(lineage) for lineage in lineages)
    for depth in range(shortest):
        if len({lineage[depth] for lineage in lineages}) > 1:
            return depth
    return shortest


def finite(scores: Sequence[float]) -> list[float]:
    """Scores with NaN read as the worst score (a scorer's NaN never wins a step)."""
    return [-math.inf if math.isnan(s) else float(s) for s in scores]
