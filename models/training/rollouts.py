"""Rollout data: token rows of prompt + completion with their final reward, as the trainers read them.

A rollout follows the Q-sharp training loop (Zhou et al., 2025): a roll-in policy writes
the completion up to a cut point h, the base policy writes the rest, and the final reward R
labels the whole (a verifier's 0 or 1, or a reward model's score). The value targets are the
tokens from the cut on (their value is the base policy's: Q^{pi_ref}); preference objectives
compare whole completions.

On disk a rollout file is JSON Lines, one ``RolloutRecord`` per line (see ``to_json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor


@dataclass(frozen=True)
class RolloutRecord:
    """One rollout: ``prompt_ids + completion_ids`` with the reward of the completion.

    ``cut`` counts the completion tokens written by the roll-in policy; the value targets are
    ``completion_ids[cut:]``. ``group`` identifies the prompt (and round) the sample belongs to.
    """

    group: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    cut: int
    reward: float
    text: str = ""

    def __post_init__(self) -> None:
        if not self.completion_ids:
            raise ValueError(f"rollout of {self.group!r} has no completion tokens")
        if not 0 <= self.cut < len(self.completion_ids):
            raise ValueError(f"rollout of {self.group!r}: cut {self.cut} outside [0, {len(self.completion_ids)})")

    def to_json(self) -> dict:
        body = asdict(self)
        body["prompt_ids"], body["completion_ids"] = list(self.prompt_ids), list(self.completion_ids)
        return body

    @classmethod
    def from_json(cls, body: dict) -> RolloutRecord:
        return cls(group=str(body["group"]), prompt_ids=tuple(body["prompt_ids"]),
                   completion_ids=tuple(body["completion_ids"]), cut=int(body["cut"]),
                   reward=float(body["reward"]), text=str(body.get("text", "")))


def write_rollouts(records: Iterable[RolloutRecord], path: Path) -> None:
    """Write ``records`` as JSON Lines (through a temporary file, so a killed run leaves none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
    partial.replace(path)


def read_rollouts(path: Path) -> list[RolloutRecord]:
    """The records of a rollout file; ValueError naming the line of a bad one."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(RolloutRecord.from_json(json.loads(line)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}: line {number}: not a rollout record ({exc})") from exc
    return records


@dataclass(frozen=True)
class Rollouts:
    """Right-padded token rows (prompt + completion) and their rewards, as tensors."""

    input_ids: Tensor  # [N, T] long, padded with the pad id
    completion_mask: Tensor  # [N, T] bool, True on generated tokens (eos included)
    target_mask: Tensor  # [N, T] bool, True on the value targets: generated tokens from the cut on
    rewards: Tensor  # [N] float: a verifier's 0 or 1, or a reward model's score
    problem: Tensor  # [N] long, index of the prompt group (shared by its samples)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def subset(self, index: Tensor) -> Rollouts:
        return Rollouts(self.input_ids[index], self.completion_mask[index], self.target_mask[index],
                        self.rewards[index], self.problem[index])

    def trimmed(self) -> Rollouts:
        """The same rows without the padding columns no row uses."""
        used = self.completion_mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if len(used) else self.input_ids.shape[1]
        return Rollouts(self.input_ids[:, :length], self.completion_mask[:, :length], self.target_mask[:, :length],
                        self.rewards, self.problem)

    @property
    def pass_at_1(self) -> float:
        return float(self.rewards.mean())


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    """Right-padded ids ``[N, T]``."""
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    return ids


def span_mask(starts: Tensor, ends: Tensor, length: int) -> Tensor:
    """``[N, length]`` bool, True at positions ``starts[i] <= t < ends[i]``."""
    t = torch.arange(length)
    return (t >= starts[:, None]) & (t < ends[:, None])


def to_tensors(records: Sequence[RolloutRecord], pad_id: int) -> Rollouts:
    """Stack records into ``Rollouts``; samples of one ``group`` share a problem index."""
    groups: dict[str, int] = {}
    problem = [groups.setdefault(r.group, len(groups)) for r in records]
    input_ids = pad_rows([r.prompt_ids + r.completion_ids for r in records], pad_id)
    prompt_lengths = torch.tensor([len(r.prompt_ids) for r in records])
    cuts = torch.tensor([r.cut for r in records])
    ends = torch.tensor([len(r.prompt_ids) + len(r.completion_ids) for r in records])
    length = input_ids.shape[1]
    return Rollouts(
        input_ids=input_ids,
        completion_mask=span_mask(prompt_lengths, ends, length),
        target_mask=span_mask(prompt_lengths + cuts, ends, length),
        rewards=torch.tensor([r.reward for r in records], dtype=torch.float32),
        problem=torch.tensor(problem, dtype=torch.long),
    )


def informative_groups(records: Sequence[RolloutRecord]) -> list[RolloutRecord]:
    """The records of groups whose samples' rewards differ: neither all right nor all wrong for a
    verifier's 0 or 1 (Q-sharp drops the others: they carry no signal about which continuations are
    better)."""
    outcomes: dict[str, set[float]] = {}
    for r in records:
        outcomes.setdefault(r.group, set()).add(r.reward)
    return [r for r in records if len(outcomes[r.group]) > 1]


def preference_pairs(rollouts: Rollouts) -> Tensor:
    """``[P, 2]`` (correct, incorrect) row indices: every such pair of rollouts of one problem."""
    by_problem: dict[int, tuple[list[int], list[int]]] = {}
    for row, (problem, r) in enumerate(zip(rollouts.problem.tolist(), rollouts.rewards.tolist())):
        by_problem.setdefault(problem, ([], []))[0 if r > 0.5 else 1].append(row)
    pairs = [(w, l) for correct, wrong in by_problem.values() for w in correct for l in wrong]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
