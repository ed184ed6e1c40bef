"""Verifiers by name: the built-ins, plug-ins from installed packages, and (command line only) `module:function`.

A verifier is a function ``(prompt, completion, reference) -> reward``. ``reference`` is what the
task says is right (the prompt file's ``answer``, a request's ``search.reference``): any JSON
value, None when absent. A verifier that ignores it may take ``(prompt, completion)`` only.

Registration wraps the function in a RegisteredVerifier, which states whether the verifier
needs a reference, whether requests may name it as a search scorer (``served``), and how to
read the answer a completion gives (for maj@k). Calling it never fails for the verifier's own
sake: an exception (or a reward that is not a finite number) scores 0.0, is logged and is
counted (``error_counts``; the server exports it as ``alignserve_verifier_errors_total``).

Plug-ins: any installed distribution may declare verifiers in the ``alignserve.verifiers``
entry-point group (name -> callable); they are loaded on the first look-up (the server's start,
a command's start), and may set ``needs_reference``, ``served`` and ``answer`` as attributes of the
callable. A plug-in may not take a registered name. ``resolve_verifier`` also imports
``package.module:function`` for ``--verifier`` of ``alignserve train`` / ``eval``; nothing a
request sends is ever imported (requests name registered verifiers only).
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from guidance.verifiers.plugins import entry_point_verifiers, import_verifier

logger = logging.getLogger(__name__)

AnswerExtractor = Callable[[str], Hashable | None]  # completion text -> its answer (None: gives none)
VerifierFunction = Callable[..., float]  # (prompt, completion, reference) or (prompt, completion) -> reward


class UnknownVerifierError(KeyError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name)
        self.message = f"Unknown verifier {name!r}; available: {', '.join(known) or '(none)'}"

    def __str__(self) -> str:
        return self.message


class MissingReferenceError(ValueError):
    """A verifier that needs a reference was called without one (callers check before they run)."""


def _takes_reference(function: Callable[..., Any]) -> bool:
    """Whether `function` accepts a third positional argument (the reference)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: assume the full form
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in parameters)


@dataclass(eq=False)
class RegisteredVerifier:
    name: str
    function: VerifierFunction
    needs_reference: bool = False
    served: bool = True  # requests may name it as a search scorer
    answer: AnswerExtractor | None = None
    errors: int = field(default=0, init=False)  # calls that raised or returned no finite number

    def __post_init__(self) -> None:
        self._takes_reference = _takes_reference(self.function)
        self._lock = threading.Lock()

    def __call__(self, prompt: str, completion: str, reference: Any = None) -> float:
        """The reward; 0.0 (logged, counted) when the verifier raises. MissingReferenceError when it
        needs a reference and `reference` is None."""
        if reference is None and self.needs_reference:
            raise MissingReferenceError(f"verifier {self.name!r} needs a reference (the prompt's answer)")
        try:
            args = (prompt, completion, reference) if self._takes_reference else (prompt, completion)
            reward = float(self.function(*args))
            if not math.isfinite(reward):
                raise ValueError(f"reward {reward} is not a finite number")
            return reward
        except Exception as exc:
            with self._lock:
                self.errors += 1
            message = next(iter(str(exc).splitlines()), "")[:300]
            logger.warning("verifier %r failed (scored 0): %s: %s", self.name, type(exc).__name__, message)
            return 0.0

    def describe(self) -> dict[str, Any]:
        return {"needs_reference": self.needs_reference}


_VERIFIERS: dict[str, RegisteredVerifier] = {}
_plugins_loaded = False
_plugins_lock = threading.Lock()


def _options(function: Callable[..., Any]) -> dict[str, Any]:
    """A plug-in's declared options: the attributes ``needs_reference``, ``served`` and ``answer``."""
    return {"needs_reference": bool(getattr(function, "needs_reference", False)),
            "served": bool(getattr(function, "served", True)), "answer": getattr(function, "answer", None)}


def register_verifier(name: str, verifier: VerifierFunction, answer: AnswerExtractor | None = None, *,
                      needs_reference: bool = False, served: bool = True) -> RegisteredVerifier:
    """Add ``verifier`` under ``name``; a name may be registered once only."""
    if name in _VERIFIERS:
        raise ValueError(f"verifier name {name!r} is already registered")
    registered = RegisteredVerifier(name, verifier, needs_reference, served, answer)
    _VERIFIERS[name] = registered
    return registered


def _load_plugins() -> None:
    """Register the ``alignserve.verifiers`` entry points, once."""
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
        for name, function, source in entry_point_verifiers():
            if name in _VERIFIERS:
                raise ValueError(f"verifier name {name!r} from {source} is already taken")
            register_verifier(name, function, **_options(function))


def get_verifier(name: str) -> RegisteredVerifier:
    """The verifier registered as ``name``; UnknownVerifierError if none is."""
    _load_plugins()
    if name not in _VERIFIERS:
        raise UnknownVerifierError(name, verifier_names())
    return _VERIFIERS[name]


def verifier_names() -> list[str]:
    """Registered names (built-ins and plug-ins), sorted."""
    _load_plugins()
    return sorted(_VERIFIERS)


def answer_extractor(name: str) -> AnswerExtractor | None:
    """The answer extractor of verifier ``name`` (None when it has none); UnknownVerifierError for
    an unknown name."""
    return get_verifier(name).answer


def error_counts() -> dict[str, int]:
    """Failed calls of every registered verifier since the process started."""
    return {name: _VERIFIERS[name].errors for name in verifier_names()}


def resolve_verifier(spec: str) -> RegisteredVerifier:
    """A registered verifier by name, or ``package.module:function`` imported (for the command
    line's ``--verifier`` only). ValueError when the import fails."""
    if ":" not in spec or spec in verifier_names():
        return get_verifier(spec)
    return _imported(spec)


@cache
def _imported(path: str) -> RegisteredVerifier:
    function = import_verifier(path)
    return RegisteredVerifier(path, function, **_options(function))
