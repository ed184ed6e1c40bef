"""What a search reports per choice, beside the KL of its per-step guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SearchReport:
    """best_of_n: the scores of the N candidates and the index kept. blockwise: per block,
    the scores of its candidates and the index kept. `score` is the kept candidate's
    (for blockwise, the last block's: the score of the whole completion)."""

    score: float
    candidate_scores: tuple[float, ...] | tuple[tuple[float, ...], ...]
    selected: int | tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        return {"score": self.score, "candidate_scores": plain(self.candidate_scores),
                "selected": plain(self.selected)}
