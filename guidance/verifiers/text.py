"""Reading a completion's text: fenced blocks, normalised strings (both linear in the text's length)."""

from __future__ import annotations

FENCE = "```"


def fenced_block(text: str, languages: tuple[str, ...]) -> str | None:
    """The body of the first fenced block (opened by a line starting with ```) labelled with one of
    `languages` (lower case) or unlabelled, or None; a block the completion left open runs to the end."""
    lines = text.splitlines(keepends=True)
    start: int | None = None  # first body line of the block being read
    skipping = False  # inside a block of another language
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped.startswith(FENCE):
            continue
        if start is not None:
            return "".join(lines[start:index])
        if skipping:
            skipping = False
            continue
        label = (stripped[len(FENCE):].split() or [""])[0].lower()
        if label in languages or not label:
            start = index + 1
        else:
            skipping = True
    return None if start is None else "".join(lines[start:])


def normalise(text: str) -> str:
    """Stripped, whitespace runs collapsed to one space, case-folded."""
    return " ".join(text.split()).casefold()
