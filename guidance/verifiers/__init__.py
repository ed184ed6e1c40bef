"""Rule-based verifiers: rewards computed by code, not a model, by the names users give them.

A verifier maps ``(prompt text, completion text, reference)`` to a reward; ``reference`` is the
prompt file's ``answer`` (``alignserve train`` / ``eval``) or a request's ``search.reference``
(any JSON value, None when absent). Best-of-N and blockwise search can name one as their scorer.

Modules:

- ``registry``: registration, look-up, failures scored 0 and counted, ``module:function``;
- ``plugins``: the ``alignserve.verifiers`` entry-point group and import paths;
- ``builtin``: the built-in verifiers (its docstring has the table);
- ``answers``: ``exact``, ``regex``, ``json-schema``, ``math``; ``text``: reading completions;
- ``worker`` / ``checks``: checks that may hold the GIL, in processes that can be killed;
- ``python_tests`` / ``sandbox`` / ``sandbox_child``: ``python-tests`` and the limits it runs under.

Unknown names fail loudly with the list of known ones.
"""

from __future__ import annotations

from guidance.verifiers import builtin  # noqa: F401  (registers the built-ins)
from guidance.verifiers.plugins import ENTRY_POINT_GROUP
from guidance.verifiers.registry import (
    AnswerExtractor,
    MissingReferenceError,
    RegisteredVerifier,
    UnknownVerifierError,
    VerifierFunction,
    answer_extractor,
    error_counts,
    get_verifier,
    register_verifier,
    resolve_verifier,
    verifier_names,
)

Verifier = RegisteredVerifier  # what get_verifier returns, by this package's earlier name

__all__ = [
    "ENTRY_POINT_GROUP", "AnswerExtractor", "MissingReferenceError", "RegisteredVerifier", "UnknownVerifierError",
    "Verifier", "VerifierFunction", "answer_extractor", "error_counts", "get_verifier", "register_verifier",
    "resolve_verifier", "verifier_names",
]
