"""A finished completion cut into steps at a delimiter (a blank line by default), for step scorers.

Each step keeps the delimiter that ends it, so the steps' texts join back to the completion's text;
the text after the last delimiter is the last step (a completion with no delimiter is one step, an
empty one too). The token ids are cut where the decoded prefix first covers a step's end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from guidance.search.scorers import DEFAULT_STEP_DELIMITER, Completion


def split_text(text: str, delimiter: str = DEFAULT_STEP_DELIMITER) -> list[str]:
    """`text` as its steps: "a\\n\\nb" -> ["a\\n\\n", "b"]; "a\\n\\n" -> ["a\\n\\n"]; "" -> [""]."""
    steps, start = [], 0
    while (at := text.find(delimiter, start)) >= 0:
        steps.append(text[start:at + len(delimiter)])
        start = at + len(delimiter)
    if start < len(text) or not steps:
        steps.append(text[start:])
    return steps


def split_completion(completion: Completion, delimiter: str,
                     decode: Callable[[Sequence[int]], str]) -> list[Completion]:
    """`completion` as its steps, each with its text and the token ids that spell it (`decode`: the base
    model's ids -> text; a token that spans a delimiter goes to the step it ends in)."""
    texts = split_text(completion.text, delimiter)
    ids, steps, cut, end = completion.token_ids, [], 0, 0
    for k, text in enumerate(texts):
        end += len(text)
        # The fewest tokens whose text reaches the step's end (binary search: decoded prefixes only grow).
        low, high = cut, len(ids)
        while k < len(texts) - 1 and low < high:
            middle = (low + high) // 2
            if len(decode(ids[:middle])) >= end:
                high = middle
            else:
                low = middle + 1
        upto = high if k < len(texts) - 1 else len(ids)
        steps.append(Completion(text, tuple(ids[cut:upto])))
        cut = upto
    return steps
