"""Names `alignserve train` gives the guide models it writes, which other commands derive from the name a user gives."""

from __future__ import annotations


def reference_name(expert: str) -> str:
    """The guide-model name of an expert's reference (its backbone before tuning), as `train expert` writes it."""
    return f"{expert}-reference"
