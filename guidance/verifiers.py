"""Rule-based verifiers by name: sequence rewards computed by code, not a model.

A verifier maps ``(prompt text, completion text)`` to a reward; best-of-N can
name one instead of a sequence reward model. Built-in:

- ``demo-verifier``: 1.0 when the completion's first integer is the answer to
  the demo arithmetic problem in the prompt, else 0.0.
- ``arith-first-line``: 1.0 when the last integer on the completion's first line
  is the sum asked for by the ``chat-arith`` question in the prompt
  (``models.tasks.chat_arith``), else 0.0.

A verifier may also name the answer a completion gives (``answer_extractor``), so an
evaluation can take a majority vote over samples (maj@k).

Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Protocol

from models.demo.task import first_integer
from models.demo.task import reward as demo_reward
from models.tasks.chat_arith import first_line_answer
from models.tasks.chat_arith import reward as arith_first_line_reward


class Verifier(Protocol):
    def __call__(self, prompt: str, completion: str) -> float: ...


class UnknownVerifierError(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"Unknown verifier {name!r}; available: {', '.join(known) or '(none)'}"

    def __str__(self) -> str:
        return self.message


AnswerExtractor = Callable[[str], Hashable | None]  # completion text -> its answer (None: gives none)

_VERIFIERS: dict[str, Verifier] = {}
_EXTRACTORS: dict[str, AnswerExtractor] = {}


def register_verifier(name: str, verifier: Verifier, answer: AnswerExtractor | None = None) -> None:
    """Add ``verifier`` under ``name`` (with the function naming a completion's answer, if it has
    one); a name may be registered once only."""
    if name in _VERIFIERS:
        raise ValueError(f"verifier name {name!r} is already registered")
    _VERIFIERS[name] = verifier
    if answer is not None:
        _EXTRACTORS[name] = answer


def answer_extractor(name: str) -> AnswerExtractor | None:
    """The answer extractor of verifier ``name`` (None when it has none); UnknownVerifierError
    for an unknown name."""
    get_verifier(name)
    return _EXTRACTORS.get(name)


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name``; UnknownVerifierError if none is."""
    if name not in _VERIFIERS:
        raise UnknownVerifierError(name, verifier_names())
    return _VERIFIERS[name]


def verifier_names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_VERIFIERS)


register_verifier("demo-verifier", demo_reward, answer=first_integer)
register_verifier("arith-first-line", arith_first_line_reward, answer=first_line_answer)
