"""Verifiers that compare a completion with its reference: ``exact``, ``regex``, ``json-schema``, ``math``.

Each scores 1.0 or 0.0 and needs a reference. A reference of the wrong shape is an error (the
registry scores it 0, logs and counts it). ``regex``, ``json-schema`` and ``math`` run their
check in a worker process under a time limit (``guidance.verifiers.worker``): a request's
reference is a pattern or a schema from a client, and the completion is a model's.
"""

from __future__ import annotations

import json
from typing import Any

from guidance.verifiers.text import fenced_block, normalise
from guidance.verifiers.worker import WorkerCallError, WorkerDied, WorkerPool, WorkerTimeout

REGEX_TIMEOUT_S = 2.0
JSON_SCHEMA_TIMEOUT_S = 5.0
MATH_TIMEOUT_S = 10.0

_CHECKS = WorkerPool("guidance.verifiers.checks")


def exact(prompt: str, completion: str, reference: Any) -> float:
    """1.0 when the normalised completion equals the normalised reference (a string, or a list of
    accepted strings)."""
    accepted = [reference] if isinstance(reference, str) else reference
    if not isinstance(accepted, list) or not accepted or not all(isinstance(a, str) for a in accepted):
        raise ValueError("exact: the reference must be a string or a non-empty list of strings")
    return float(normalise(completion) in {normalise(a) for a in accepted})


def regex(prompt: str, completion: str, reference: Any) -> float:
    """1.0 when the reference, a Python regular expression, matches anywhere in the completion
    (``re.search``; anchor it with ``\\A...\\Z`` for a whole-completion match)."""
    if not isinstance(reference, str):
        raise ValueError("regex: the reference must be a pattern string")
    return float(_CHECKS.call("regex_search", reference, completion, timeout_s=REGEX_TIMEOUT_S))


def json_schema(prompt: str, completion: str, reference: Any) -> float:
    """1.0 when the completion (or the body of its first ```json block) parses as JSON and validates
    against the reference, a JSON schema."""
    if not isinstance(reference, (dict, bool)):
        raise ValueError("json-schema: the reference must be a JSON schema (an object or a boolean)")
    block = fenced_block(completion, ("json",))
    try:
        document = json.loads(completion if block is None else block)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
        return 0.0
    return float(_CHECKS.call("json_valid", reference, document, timeout_s=JSON_SCHEMA_TIMEOUT_S))


def math_answer(prompt: str, completion: str, reference: Any) -> float:
    """1.0 when the completion's final answer equals the reference (a number or a string of
    LaTeX / plain math) mathematically, by math-verify (``checks.math_equal``)."""
    if isinstance(reference, bool) or not isinstance(reference, (str, int, float)):
        raise ValueError("math: the reference must be a number or a string")
    return float(_CHECKS.call("math_equal", str(reference), completion, timeout_s=MATH_TIMEOUT_S))



def math_final_answer(completion: str) -> str | None:
    """The answer `math` reads in a completion, in a canonical form (``checks.final_answer``); None when it
    reads none or the check fails."""
    try:
        return _CHECKS.call("final_answer", completion, timeout_s=MATH_TIMEOUT_S)
    except (WorkerCallError, WorkerTimeout, WorkerDied):  # an unreadable or hostile completion gives none
        return None
