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

from jsonschema.validators import validator_for
from math_verify import parse, verify

# math-verify warns, once per process, that its timeouts are off: the worker's limit stands in for them.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def math_equal(reference: str, completion: str) -> bool:
    """Whether the completion's final answer equals the reference mathematically (math-verify:
    LaTeX, ``\\boxed{}``, fractions, thousands separators, symbolic equality). The reference is
    read as it is, else as inline LaTeX ``$reference$``; ValueError when neither gives an answer."""
    gold = parse(reference, parsing_timeout=None) or parse(f"${reference}$", parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify reads no answer in the reference {reference!r}")
    answer = parse(completion, parsing_timeout=None)
    return bool(answer) and verify(gold, answer, timeout_seconds=None)


def regex_search(pattern: str, completion: str) -> bool:
    """Whether `pattern` matches anywhere in the completion (``re.search``); re.error for a bad pattern."""
    return re.search(pattern, completion) is not None


def json_valid(schema: Any, document: Any) -> bool:
    """Whether `document` validates against `schema` (its ``$schema`` draft, else the latest);
    SchemaError for an invalid schema. References to other documents are not fetched."""
    validator = validator_for(schema)
    validator.check_schema(schema)
    return validator(schema).is_valid(document)
