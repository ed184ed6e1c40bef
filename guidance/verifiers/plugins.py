"""Verifiers from code outside this package: installed entry points and ``module:function`` paths.

A distribution declares its verifiers in its pyproject::

    [project.entry-points."alignserve.verifiers"]
    my-check = "mypackage.checks:my_check"    # (prompt, completion, reference) -> reward
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "alignserve.verifiers"


def _check_callable(function: Any, source: str) -> Callable[..., float]:
    if not callable(function):
        raise ValueError(f"verifier {source} is not callable")
    return function


def entry_point_verifiers() -> list[tuple[str, Callable[..., float], str]]:
    """(name, function, source) of every installed ``alignserve.verifiers`` entry point, loaded."""
    return [(entry.name, _check_callable(entry.load(), entry.value), entry.value)
            for entry in entry_points(group=ENTRY_POINT_GROUP)]


def import_verifier(path: str) -> Callable[..., float]:
    """The callable at ``package.module:function`` (dotted attributes allowed after the colon);
    ValueError naming the path when it cannot be imported."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"verifier {path!r}: expected package.module:function")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"verifier {path!r}: cannot import it ({type(exc).__name__}: {exc})") from exc
    return _check_callable(target, repr(path))
