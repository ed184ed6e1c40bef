"""What a search reports per choice, beside the KL of its per-step guidance."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Checkpoint:
    """One pruning checkpoint of best-of-N: the generated length the live candidates were scored
    at, their indexes, their partial-sequence scores, and the indexes aborted."""

    tokens: int
    scored: tuple[int, ...]
    scores: tuple[float, ...]
    pruned: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "scored": list(self.scored), "scores": list(self.scores),
                "pruned": list(self.pruned)}


@dataclass(frozen=True)
class SearchReport:
    """best_of_n: the scores of the N candidates (None for a pruned one) and the index kept, and with
    `prune` its checkpoints. blockwise: per block, the scores of its candidates and the index kept.
    `score` is the kept candidate's (for blockwise, the last block's: the score of the whole
    completion). `generated_tokens` counts the tokens of every candidate, kept, discarded or pruned:
    the search's generation cost."""

    score: float
    candidate_scores: tuple[float | None, ...] | tuple[tuple[float, ...], ...]
    selected: int | tuple[int, ...]
    generated_tokens: int
    checkpoints: tuple[Checkpoint, ...] | None = None

    def as_dict(self) -> dict[str, Any]:
        def plain(value):
            return [plain(v) for v in value] if isinstance(value, tuple) else value

        report = {"score": self.score, "candidate_scores": plain(self.candidate_scores),
                  "selected": plain(self.selected), "generated_tokens": self.generated_tokens}
        if self.checkpoints is not None:
            report["checkpoints"] = [c.as_dict() for c in self.checkpoints]
        return report


@dataclass(frozen=True)
class StepRound:
    """One step of a step-level search: the scores of its candidates (each candidate's aggregate over
    its steps so far) and the candidates it kept (particle filtering: the resampled ones, with repeats)."""

    scores: tuple[float, ...]
    kept: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"candidates": len(self.scores), "scores": list(self.scores), "kept": list(self.kept)}


@dataclass(frozen=True)
class StepSearchReport:
    """beam, dvts, particle_filter: each step's candidates, scores and the ones kept; the finished
    solutions' scores and the one answering (`selected`; `answer` with a weighted-majority pick);
    `generated_tokens` counts every token of every expansion (the search's cost), `kept_tokens` the
    answer's."""

    score: float
    rounds: tuple[StepRound, ...]
    finished_scores: tuple[float, ...]
    selected: int
    generated_tokens: int
    kept_tokens: int
    answer: str | None = None

    def as_dict(self) -> dict[str, Any]:
        report = {"score": self.score, "search_steps": [r.as_dict() for r in self.rounds],
                  "candidate_scores": list(self.finished_scores), "selected": self.selected,
                  "generated_tokens": self.generated_tokens, "kept_tokens": self.kept_tokens}
        if self.answer is not None:
            report["answer"] = self.answer
        return report
