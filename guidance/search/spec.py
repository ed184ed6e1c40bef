"""A request's `search` object: parsed, bounded by the operator's caps, checked against the scorers.

    {"type": "best_of_n", "n": 8, "scorer": "demo-reward", "temperature": 0.0}
    {"type": "best_of_n", "n": 32, "scorer": "demo-reward",
     "prune": {"scorer": "demo-value-hist", "every": 16, "fraction": 0.5, "min_keep": 2}}
    {"type": "blockwise", "candidates": 4, "block_tokens": 8, "scorer": "demo-prefix", "temperature": 0.0}

`temperature` is the selection temperature: 0 keeps the best-scored candidate, a positive
value samples one with probability proportional to exp(score / temperature). `reference` (any
JSON value) is what a verifier scorer compares completions with, e.g.

    {"type": "best_of_n", "n": 8, "scorer": "math", "reference": "1/2"}

a verifier that needs one and gets none is refused (`search.reference`); other scorers ignore it.
A best-of-N `aggregate` ("last", "min", "prod", "mean") scores each step of the candidates with a
step scorer and keeps the best aggregate (`guidance.search.aggregate`):

    {"type": "best_of_n", "n": 8, "scorer": "qwen-prm", "aggregate": "min"}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from guidance.errors import GuidanceError
from guidance.params import validate_entry
from guidance.search.aggregate import Aggregate

MAX_SELECTION_TEMPERATURE = 1000.0


class _SearchParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN: "should be a finite number"

    type: str
    scorer: str = Field(min_length=1, description="A verifier or sequence scorer configured by the operator.")
    temperature: float = Field(
        default=0.0, ge=0.0, le=MAX_SELECTION_TEMPERATURE,
        description="Selection temperature: 0 keeps the best candidate; > 0 samples by softmax(score / temperature).",
    )

    reference: Any = Field(
        default=None, description="What a verifier scorer compares completions with (e.g. the answer of `math`).")

    candidates_field: ClassVar[str]

    @property
    def candidates_per_pick(self) -> int:
        """Engine requests each choice runs at once."""
        return getattr(self, self.candidates_field)


class Prune(BaseModel):
    """Early rejection of best-of-N candidates: after every `every` generated tokens, the live
    candidates' partial sequences (their first `every * checkpoint` tokens) are scored by
    `scorer` and the lowest `floor(live * fraction)` are aborted, never leaving fewer than
    `min_keep` candidates."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    scorer: str = Field(min_length=1, description="A guide model that scores partial sequences (a value head).")
    every: int = Field(ge=1, description="Generated tokens between checkpoints.")
    fraction: float = Field(gt=0.0, lt=1.0, description="Share of the live candidates aborted at a checkpoint.")
    min_keep: int = Field(default=1, ge=1, description="Candidates never pruned below this many.")


class BestOfN(_SearchParams):
    """Sample `n` completions, score each whole completion, keep one."""

    type: Literal["best_of_n"]
    n: int = Field(ge=1, description="Candidates sampled per choice.")
    prune: Prune | None = Field(default=None, description="Abort the weakest candidates early (Prune).")
    aggregate: Aggregate | None = Field(
        default=None, description="With a scorer that scores steps (a process reward model, a prefix scorer): "
        "score each step and keep the candidate with the best last, min, prod or mean of its step scores "
        "(default: the scorer's own score of the whole completion, a PRM's last step's).")

    candidates_field = "n"


class Blockwise(_SearchParams):
    """Sample `candidates` continuations of `block_tokens` tokens, keep one, append, repeat."""

    type: Literal["blockwise"]
    candidates: int = Field(ge=1, description="Continuations sampled per block.")
    block_tokens: int = Field(ge=1, description="Tokens per block.")

    candidates_field = "candidates"


SearchParams = BestOfN | Blockwise
SEARCH_TYPES: dict[str, type[_SearchParams]] = {"best_of_n": BestOfN, "blockwise": Blockwise}


@dataclass(frozen=True)
class SearchLimits:
    max_candidates: int  # caps best_of_n.n and blockwise.candidates
    max_block_tokens: int


def parse_search(entry: Any, scorers: Sequence[str], limits: SearchLimits, param: str = "search",
                 prefix_scorers: Sequence[str] = (), reference_scorers: Sequence[str] = (),
                 step_scorers: Sequence[str] = ()) -> SearchParams:
    """Validate a request's `search` object against the configured scorer names (`prefix_scorers`:
    those that can score partial sequences, for `prune`; `reference_scorers`: those that need
    `reference`; `step_scorers`: those that score steps, for `aggregate`); GuidanceError naming the
    first bad field."""
    if not isinstance(entry, dict):
        raise GuidanceError("search must be an object", param)
    kind = entry.get("type")
    if kind is None:
        raise GuidanceError(f"Missing search parameter: {param}.type", f"{param}.type")
    if kind not in SEARCH_TYPES:
        raise GuidanceError(f"Unknown search type {kind!r}; available: {', '.join(SEARCH_TYPES)}", f"{param}.type")
    spec = validate_entry(SEARCH_TYPES[kind], entry, param)
    field = spec.candidates_field
    if spec.candidates_per_pick > limits.max_candidates:
        raise GuidanceError(
            f"{param}.{field} must be at most {limits.max_candidates}, got {spec.candidates_per_pick}",
            f"{param}.{field}")
    if isinstance(spec, Blockwise) and spec.block_tokens > limits.max_block_tokens:
        raise GuidanceError(
            f"{param}.block_tokens must be at most {limits.max_block_tokens}, got {spec.block_tokens}",
            f"{param}.block_tokens")
    if spec.scorer not in scorers:
        raise GuidanceError(
            f"Unknown scorer {spec.scorer!r}; configured: {', '.join(scorers) or 'none'}", f"{param}.scorer")
    if spec.reference is None and spec.scorer in reference_scorers:
        raise GuidanceError(f"The scorer {spec.scorer!r} compares completions with a reference: give "
                            f"{param}.reference", f"{param}.reference")
    if getattr(spec, "aggregate", None) is not None and spec.scorer not in step_scorers:
        raise GuidanceError(
            f"{param}.aggregate needs a scorer that scores steps; {spec.scorer!r} scores whole completions "
            f"(step scorers: {', '.join(step_scorers) or 'none'})", f"{param}.aggregate")
    prune = getattr(spec, "prune", None)
    if prune is not None:
        if prune.scorer not in prefix_scorers:
            raise GuidanceError(
                f"{param}.prune.scorer must be a guide model that scores partial sequences; {prune.scorer!r} is not "
                f"one (configured: {', '.join(prefix_scorers) or 'none'})", f"{param}.prune.scorer")
        if prune.min_keep > spec.n:
            raise GuidanceError(f"{param}.prune.min_keep must be at most n ({spec.n}), got {prune.min_keep}",
                                f"{param}.prune.min_keep")
    return spec
