"""The registry of rule-based verifiers."""

from __future__ import annotations

import pytest

from guidance import verifiers
from models.tasks import chat_arith
from guidance.verifiers import (
    UnknownVerifierError,
    answer_extractor,
    get_verifier,
    register_verifier,
    verifier_names,
)


def test_demo_verifier_registered_and_scores() -> None:
    assert "demo-verifier" in verifier_names()
    verify = get_verifier("demo-verifier")
    assert verify("12+34=", "46") == 1.0
    assert verify("<s><|user|>3-10=<|assistant|>", "-7</s>") == 1.0
    assert verify("12+34=", "45") == 0.0


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(UnknownVerifierError) as info:
        get_verifier("no-such-verifier")
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "no-such-verifier" in message
    assert "demo-verifier" in message


def test_register_and_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Register into a copy of the table, so other tests see the original.
    monkeypatch.setattr(verifiers, "_VERIFIERS", dict(verifiers._VERIFIERS))
    name = "test-length-verifier"

    def by_length(prompt: str, completion: str) -> float:
        return float(len(completion))

    register_verifier(name, by_length)
    assert get_verifier(name)("p", "abc") == 3.0
    assert name in verifier_names()
    with pytest.raises(ValueError, match=name):
        register_verifier(name, by_length)
    with pytest.raises(ValueError, match="demo-verifier"):
        register_verifier("demo-verifier", by_length)


def test_arith_first_line_reads_the_last_integer_of_the_first_line() -> None:
    verify = get_verifier("arith-first-line")
    prompt = "<|im_start|>user\nWhat is 12+19? Answer with the number only.<|im_end|>\n<|im_start|>assistant\n"
    assert verify(prompt, "12 + 19 = 31") == 1.0
    assert verify(prompt, "\n31.\nI hope that helps, 12") == 1.0  # blank lines before the first line are skipped
    assert verify(prompt, "31 is wrong, it is 30") == 0.0
    assert verify(prompt, "thirty-one") == 0.0
    assert verify("What is the capital of France?", "31") == 0.0  # no question, no reward
    assert answer_extractor("arith-first-line")("12 + 19 = 31\n7") == 31
    assert answer_extractor("demo-verifier")("-7 and 8") == -7


def test_chat_arith_holds_out_a_fifth_of_the_grid() -> None:
    train, held_out = chat_arith.problems("train"), chat_arith.problems("heldout")
    assert (len(train), len(held_out)) == (720, 180)
    assert not {(p.a, p.b) for p in train} & {(p.a, p.b) for p in held_out}
    assert all((31 * p.a + p.b) % 5 == 0 for p in held_out)
    with pytest.raises(ValueError, match="split"):
        chat_arith.problems("test")
