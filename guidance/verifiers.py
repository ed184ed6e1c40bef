"""Rule-based verifiers by name: sequence rewards computed by code, not a model.

A verifier maps ``(prompt text, completion text)`` to a reward; best-of-N can
name one instead of a sequence reward model. Built-in:

- ``demo-verifier``: 1.0 when the completion's first integer is the answer to
  the demo arithmetic problem in the prompt, else 0.0.

Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from typing import Protocol

from models.demo.task import reward as demo_reward


class Verifier(Protocol):
    def __call__(self, prompt: str, completion: str) -> float: ...


class UnknownVerifierError(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"Unknown verifier {name!r}; available: {', '.join(known) or '(none)'}"

    def __str__(self) -> str:
        return self.message


_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str, verifier: Verifier) -> None:
    """Add ``verifier`` under ``name``; a name may be registered once only."""
    if name in _VERIFIERS:
        raise ValueError(f"verifier name {name!r} is already registered")
    _VERIFIERS[name] = verifier


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name``; UnknownVerifierError if none is."""
    if name not in _VERIFIERS:
        raise UnknownVerifierError(name, verifier_names())
    return _VERIFIERS[name]


def verifier_names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_VERIFIERS)


register_verifier("demo-verifier", demo_reward)
