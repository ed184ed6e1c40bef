"""The registry of rule-based verifiers."""

from __future__ import annotations

import pytest

from guidance import verifiers
from guidance.verifiers import (
    UnknownVerifierError,
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
