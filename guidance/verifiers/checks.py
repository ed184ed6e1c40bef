"""The checks that run inside verifier worker processes (``guidance.verifiers.worker``), one per call.

Each may run for ever or exhaust memory on hostile input (a power tower, a catastrophic
pattern), which is why the worker runs them under a time limit it enforces by killing. Their
own timeouts are off: math-verify's use SIGALRM, which only works in a main thread and cannot
interrupt a C call anyway.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import sympy
from jsonschema.validators import validator_for
from math_verify import parse, verify

# math-verify warns, once per process, that its timeouts are off: the worker's limit stands in for them.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def math_equal(reference: str, completion: str) -> bool:
    """Whether the completion's final answer equals the reference mathematically (math-verify:
    LaTeX, ``\\boxed{}``, fractions, thousands separators, symbolic equality). The reference is
    read as inline LaTeX ``$reference$``, else as it is; ValueError when neither gives an answer. When the
    reference is a number, the answer must be written as one (``is_number``)."""
    # As inline LaTeX first: read as plain text, "2+\\sqrt{3}" gives only its first number.
    gold = parse(f"${reference}$", parsing_timeout=None) or parse(reference, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify reads no answer in the reference {reference!r}")
    answer = parse(completion, parsing_timeout=None)
    if not answer or (is_number(gold[0]) and not is_number(answer[0])):
        return False  # a number's answer is a number: "18 + 17" restates "What is 18+17?", it does not answer it
    return verify(gold, answer, timeout_seconds=None)


def final_answer(completion: str) -> str | None:
    """The completion's final answer as math-verify reads it, in a canonical form (sympy's: "66", "1/2"), for
    grouping answers (maj@k, weighted majority); None when it gives none."""
    answer = parse(completion, parsing_timeout=None)
    return str(answer[0]) if answer else None


def is_number(expression: Any) -> bool:
    """Whether a parsed answer is written as a number: an integer, a decimal, a fraction p/q or a percentage,
    optionally negative; not an unevaluated sum, product or power of numbers."""
    if isinstance(expression, sympy.Number):
        return True
    if not isinstance(expression, sympy.Mul):
        return False
    factors = [f for f in expression.args if f != -1]
    numbers = [f for f in factors if isinstance(f, sympy.Number)]
    divisors = [f for f in factors if isinstance(f, sympy.Pow) and isinstance(f.base, sympy.Number) and f.exp == -1]
    percent = [f for f in factors if isinstance(f, sympy.UnevaluatedExpr) and f.args[0] == sympy.Rational(1, 100)]
    return len(numbers) == 1 and len(numbers) + len(divisors) + len(percent) == len(factors) \
        and len(divisors) + len(percent) <= 1


def regex_search(pattern: str, completion: str) -> bool:
    """Whether `pattern` matches anywhere in the completion (``re.search``); re.error for a bad pattern."""
    return re.search(pattern, completion) is not None


def json_valid(schema: Any, document: Any) -> bool:
    """Whether `document` validates against `schema` (its ``$schema`` draft, else the latest);
    SchemaError for an invalid schema. References to other documents are not fetched."""
    validator = validator_for(schema)
    validator.check_schema(schema)
    return validator(schema).is_valid(document)
