"""Errors of guidance specs; the server maps them to HTTP 400 with `param` set."""

from __future__ import annotations


class GuidanceError(ValueError):
    """An invalid guidance spec. `param` is the field path, e.g. ``guidance[1].strength``."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
