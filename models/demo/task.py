"""The demo task: add or subtract two integers of 1-3 digits.

A problem is the prompt text ``"<a>+<b>="`` or ``"<a>-<b>="`` with
``0 <= a, b <= 999``; its answer is the integer ``a + b`` or ``a - b`` (which may
be negative). The reward of a completion is 1 when the first integer in it
equals the answer, else 0, so it can be checked exactly.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Literal

Operator = Literal["+", "-"]

MAX_OPERAND = 999
OPERATORS: tuple[Operator, ...] = ("+", "-")
# The fixed evaluation set: never trained on, the same for every build seed.
HELD_OUT_SEED = 20_250_000
HELD_OUT_SIZE = 500

# The last "<int><op><int>=" in a text is the problem; anything before it
# (a chat template, an instruction) is ignored.
_PROBLEM_RE = re.compile(r"(?<!\d)(\d{1,3})([+-])(\d{1,3})=")
_INTEGER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem ``a op b``."""

    a: int
    op: Operator
    b: int

    def __post_init__(self) -> None:
        if self.op not in OPERATORS:
            raise ValueError(f"op must be one of {OPERATORS}, got {self.op!r}")
        for name, value in (("a", self.a), ("b", self.b)):
            if not 0 <= value <= MAX_OPERAND:
                raise ValueError(f"{name} must be in [0, {MAX_OPERAND}], got {value}")

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b


def _sample_operand(rng: random.Random) -> int:
    """Sample 1, 2 or 3 digits with equal probability, then a uniform value of
    that many digits, so short operands are not drowned out by 3-digit ones."""
    digits = rng.randint(1, 3)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_problem(rng: random.Random) -> Problem:
    """Draw one problem from ``rng``."""
    a = _sample_operand(rng)
    op = rng.choice(OPERATORS)
    b = _sample_operand(rng)
    return Problem(a, op, b)


def sample_problems(n: int, seed: int) -> list[Problem]:
    """``n`` problems, the same list for the same ``seed``."""
    rng = random.Random(seed)
    return [sample_problem(rng) for _ in range(n)]


def held_out_problems() -> list[Problem]:
    """The fixed evaluation set (HELD_OUT_SIZE problems from HELD_OUT_SEED)."""
    return sample_problems(HELD_OUT_SIZE, HELD_OUT_SEED)


def parse_prompt(text: str) -> Problem | None:
    """The problem posed by ``text`` (its last ``<int><op><int>=``), or None."""
    matches = _PROBLEM_RE.findall(text)
    if not matches:
        return None
    a, op, b = matches[-1]
    return Problem(int(a), op, int(b))


def first_integer(text: str) -> int | None:
    """The first signed integer in ``text`` (``"-12abc"`` -> -12), or None."""
    match = _INTEGER_RE.search(text)
    return int(match.group()) if match else None


def reward(prompt_text: str, completion_text: str) -> float:
    """1.0 if the completion's first integer is the prompt's answer, else 0.0.

    A prompt that poses no problem scores 0.0.
    """
    problem = parse_prompt(prompt_text)
    if problem is None:
        return 0.0
    return 1.0 if first_integer(completion_text) == problem.answer else 0.0
