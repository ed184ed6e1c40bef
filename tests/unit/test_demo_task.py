"""The demo arithmetic task: sampling, parsing and the exact reward."""

from __future__ import annotations

import pytest

from models.demo.task import (
    HELD_OUT_SIZE,
    MAX_OPERAND,
    Problem,
    first_integer,
    held_out_problems,
    parse_prompt,
    reward,
    sample_problems,
)


def test_problem_prompt_and_answer() -> None:
    assert Problem(12, "+", 34).prompt == "12+34="
    assert Problem(12, "+", 34).answer == 46
    assert Problem(5, "-", 987).prompt == "5-987="
    assert Problem(5, "-", 987).answer == -982


@pytest.mark.parametrize(
    ("a", "op", "b"), [(1000, "+", 1), (1, "-", -1), (3, "*", 4)]
)
def test_problem_rejects_out_of_range(a: int, op: str, b: int) -> None:
    with pytest.raises(ValueError):
        Problem(a, op, b)  # type: ignore[arg-type]


def test_sample_problems_deterministic_and_in_range() -> None:
    first = sample_problems(200, seed=7)
    assert first == sample_problems(200, seed=7)
    assert first != sample_problems(200, seed=8)
    assert len(first) == 200
    assert all(0 <= p.a <= MAX_OPERAND and 0 <= p.b <= MAX_OPERAND for p in first)
    assert {p.op for p in first} == {"+", "-"}
    # Operands of each digit count occur (1-digit ones are not drowned out).
    assert {len(str(p.a)) for p in first} == {1, 2, 3}


def test_held_out_problems_fixed() -> None:
    problems = held_out_problems()
    assert len(problems) == HELD_OUT_SIZE
    assert problems == held_out_problems()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12+34=", Problem(12, "+", 34)),
        ("<s>7-900=", Problem(7, "-", 900)),
        ("<s><|user|>123+456=<|assistant|>", Problem(123, "+", 456)),
        ("Solve: 1+1= then 40-41=", Problem(40, "-", 41)),
        ("<s><|system|>be exact<|user|>0-0=<|assistant|>", Problem(0, "-", 0)),
    ],
)
def test_parse_prompt_finds_last_problem(text: str, expected: Problem) -> None:
    assert parse_prompt(text) == expected


@pytest.mark.parametrize("text", ["", "hello", "12+34", "12*34=", "1234+5="])
def test_parse_prompt_none(text: str) -> None:
    assert parse_prompt(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("46", 46),
        ("-982</s>", -982),
        ("  17 apples", 17),
        ("answer: -5, not 6", -5),
        ("007", 7),
        ("- 5", 5),
        ("", None),
        ("no digits", None),
        ("-", None),
    ],
)
def test_first_integer(text: str, expected: int | None) -> None:
    assert first_integer(text) == expected


def test_reward_exact() -> None:
    assert reward("12+34=", "46") == 1.0
    assert reward("12+34=", "47") == 0.0
    assert reward("12+34=", "") == 0.0
    assert reward("12+34=", "46 or 47") == 1.0
    assert reward("12+34=", "4 6") == 0.0
    assert reward("5-987=", "-982") == 1.0
    assert reward("5-987=", "982") == 0.0
    assert reward("<s><|user|>5-987=<|assistant|>", "-982") == 1.0
    assert reward("no problem here", "46") == 0.0


def test_reward_agrees_with_answers() -> None:
    for problem in sample_problems(50, seed=3):
        assert reward(problem.prompt, str(problem.answer)) == 1.0
        assert reward(problem.prompt, str(problem.answer + 1)) == 0.0
