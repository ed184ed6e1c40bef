"""``chat-arith``: two-number addition asked in plain English, for chat models.

The user message is ``What is {a}+{b}? Answer with the number only.`` with ``a, b`` in
1..30 (900 problems). ``chat-arith-steps`` asks the same sums with ``Think step by step.``
instead: a reply of several written steps (SmolLM2-135M-Instruct separates them with blank
lines), judged on its final answer against the reference by the ``math`` verifier. Problems with ``(31 * a + b) % 5 == 0`` (180) are held out: never
used for training or rollouts, only for evaluation. A reply earns reward 1 when the last
integer on its first non-empty line equals ``a + b`` (verifier ``arith-first-line``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPERAND_RANGE = range(1, 31)
HELD_OUT_MODULUS = 5
QUESTION = "What is {a}+{b}? Answer with the number only."
STEPS_QUESTION = "What is {a}+{b}? Think step by step."

_QUESTION_RE = re.compile(r"What is (\d+)\+(\d+)\?")
_INTEGER_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithProblem:
    a: int
    b: int

    @property
    def question(self) -> str:
        return QUESTION.format(a=self.a, b=self.b)

    @property
    def steps_question(self) -> str:
        return STEPS_QUESTION.format(a=self.a, b=self.b)

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def held_out(self) -> bool:
        return (31 * self.a + self.b) % HELD_OUT_MODULUS == 0


def problems(split: str) -> list[ArithProblem]:
    """Every problem of ``split``: "train" (720), "heldout" (180) or "all" (900), in (a, b) order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    every = [ArithProblem(a, b) for a in OPERAND_RANGE for b in OPERAND_RANGE]
    if split == "all":
        return every
    return [p for p in every if p.held_out == (split == "heldout")]


def parse_question(text: str) -> ArithProblem | None:
    """The problem asked last in ``text`` (a rendered chat prompt, say), or None."""
    matches = _QUESTION_RE.findall(text)
    return ArithProblem(int(matches[-1][0]), int(matches[-1][1])) if matches else None


def first_line_answer(completion: str) -> int | None:
    """The last integer on the first non-empty line of ``completion``, or None."""
    line = next((line for line in completion.splitlines() if line.strip()), "")
    found = _INTEGER_RE.findall(line)
    return int(found[-1]) if found else None


def reward(prompt_text: str, completion_text: str) -> float:
    """1.0 when the reply's first-line answer is the sum asked for in the prompt, else 0.0."""
    problem = parse_question(prompt_text)
    if problem is None:
        return 0.0
    return 1.0 if first_line_answer(completion_text) == problem.answer else 0.0
