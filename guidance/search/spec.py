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

Step-level search (`beam`, `dvts`, `particle_filter`) grows solutions a step at a time (text up to
`step_delimiter`, a blank line by default, or `step_tokens` tokens) and scores each step with a scorer
of partial solutions (a process reward model or a prefix scorer), e.g.

    {"type": "beam", "beam_width": 4, "expansions": 4, "scorer": "demo-value-hist"}
    {"type": "dvts", "n": 16, "beam_width": 4, "scorer": "demo-value-hist"}
    {"type": "particle_filter", "particles": 8, "scorer": "demo-value-hist", "answers": "demo-verifier"}

`answers` names a verifier whose answer reader groups finished solutions: the pick is then the
weighted majority (the answer with the largest sum of scores, and its best-scored solution).

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
from guidance.verifiers import UnknownVerifierError, answer_extractor

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


ANSWERS = Field(
    default=None, min_length=1, description="A verifier that reads each finished solution's answer: the pick is "
    "then the weighted majority (the answer whose solutions' scores sum highest; its best-scored solution).")


class BestOfN(_SearchParams):
    """Sample `n` completions, score each whole completion, keep one."""

    type: Literal["best_of_n"]
    n: int = Field(ge=1, description="Candidates sampled per choice.")
    answers: str | None = ANSWERS
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


class _StepSearch(_SearchParams):
    """A search over steps: text up to `step_delimiter`, or `step_tokens` tokens, at most `max_step_tokens`."""

    step_delimiter: str = Field(default="\n\n", min_length=1, max_length=64,
                                description="Text that ends a step (default a blank line).")
    step_tokens: int | None = Field(default=None, ge=1,
                                    description="Fixed-size steps of this many tokens, instead of a delimiter.")
    max_steps: int = Field(default=32, ge=1, le=1024, description="Most steps of a solution; it ends there.")
    max_step_tokens: int = Field(default=256, ge=1, description="Most tokens of one step; a step ends there.")
    aggregate: Aggregate = Field(default="last", description="How a solution's step scores make its score: "
                                 "last, min, prod or mean.")
    answers: str | None = ANSWERS


class Beam(_StepSearch):
    """Keep `beam_width` partial solutions; each step, expand each into `expansions` one-step continuations,
    score them and keep the best `beam_width` (finished solutions wait); answer with the best finished one."""

    type: Literal["beam"]
    beam_width: int = Field(ge=1, description="Partial solutions kept after each step.")
    expansions: int = Field(ge=1, description="One-step continuations sampled from each kept solution.")

    candidates_field = "expansions"

    @property
    def candidates_per_pick(self) -> int:
        return self.beam_width * self.expansions


class DVTS(_StepSearch):
    """Diverse verifier tree search: `n / beam_width` independent subtrees, each a greedy search that keeps
    the best of `beam_width` one-step continuations at every step; answer with the best subtree's solution."""

    type: Literal["dvts"]
    n: int = Field(ge=1, description="Continuations sampled per step over all subtrees (a multiple of beam_width).")
    beam_width: int = Field(ge=1, description="Continuations per subtree per step.")

    candidates_field = "n"


class ParticleFilter(_StepSearch):
    """`particles` partial solutions, each extended by one step, then resampled with replacement with
    weights softmax(w / resample_temperature), w = logit(score) (or the score itself); finished
    particles keep their last weight and are resampled too. Answer with the best-weighted particle."""

    type: Literal["particle_filter"]
    particles: int = Field(ge=1, description="Partial solutions carried from step to step.")
    resample_temperature: float = Field(default=1.0, gt=0.0, le=MAX_SELECTION_TEMPERATURE,
                                        description="Temperature of the resampling weights.")
    weighting: Literal["logit", "score"] = Field(
        default="logit", description="logit: w = logit(score), for scores that are probabilities (a PRM's); "
        "score: w = score, for any real-valued scorer.")

    candidates_field = "particles"


SearchParams = BestOfN | Blockwise | Beam | DVTS | ParticleFilter
StepSearchParams = Beam | DVTS | ParticleFilter
SEARCH_TYPES: dict[str, type[_SearchParams]] = {
    "best_of_n": BestOfN, "blockwise": Blockwise, "beam": Beam, "dvts": DVTS, "particle_filter": ParticleFilter}


@dataclass(frozen=True)
class SearchLimits:
    max_candidates: int  # caps the engine requests one choice runs at once (SearchParams.candidates_per_pick)
    max_block_tokens: int  # caps blockwise.block_tokens and step_tokens


def parse_search(entry: Any, scorers: Sequence[str], limits: SearchLimits, param: str = "search",
                 prefix_scorers: Sequence[str] = (), reference_scorers: Sequence[str] = (),
                 step_scorers: Sequence[str] = ()) -> SearchParams:
    """Validate a request's `search` object against the configured scorer names (`prefix_scorers`:
    those that can score partial sequences, for `prune`; `reference_scorers`: those that need
    `reference`; `step_scorers`: those that score each step, for step-level search and best-of-N's
    `aggregate`); GuidanceError naming the first bad field."""
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
        what = "beam_width x expansions" if isinstance(spec, Beam) else f"{param}.{field}"
        raise GuidanceError(
            f"{what} must be at most {limits.max_candidates}, got {spec.candidates_per_pick}", f"{param}.{field}")
    if isinstance(spec, Blockwise) and spec.block_tokens > limits.max_block_tokens:
        raise GuidanceError(
            f"{param}.block_tokens must be at most {limits.max_block_tokens}, got {spec.block_tokens}",
            f"{param}.block_tokens")
    if spec.scorer not in scorers:
        raise GuidanceError(
            f"Unknown scorer {spec.scorer!r}; configured: {', '.join(scorers) or 'none'}", f"{param}.scorer")
    if isinstance(spec, _StepSearch):
        _check_steps(spec, param, limits, step_scorers)
    if getattr(spec, "answers", None) is not None:
        try:
            readable = answer_extractor(spec.answers) is not None
        except UnknownVerifierError:
            readable = False
        if not readable:
            raise GuidanceError(f"{param}.answers must name a verifier that reads answers; {spec.answers!r} is not "
                                "one", f"{param}.answers")
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


def _check_steps(spec: _StepSearch, param: str, limits: SearchLimits, step_scorers: Sequence[str]) -> None:
    if spec.scorer not in step_scorers:
        raise GuidanceError(
            f"{param}.scorer must score partial solutions step by step (a process reward model or a prefix "
            f"scorer); {spec.scorer!r} is not one (configured: {', '.join(step_scorers) or 'none'})",
            f"{param}.scorer")
    if spec.step_tokens is not None:
        if "step_delimiter" in spec.model_fields_set:
            raise GuidanceError(f"Give {param}.step_delimiter or {param}.step_tokens, not both",
                                f"{param}.step_tokens")
        if spec.step_tokens > limits.max_block_tokens:
            raise GuidanceError(
                f"{param}.step_tokens must be at most {limits.max_block_tokens}, got {spec.step_tokens}",
                f"{param}.step_tokens")
    if isinstance(spec, DVTS) and spec.n % spec.beam_width:
        raise GuidanceError(f"{param}.n must be a multiple of beam_width ({spec.beam_width}), got {spec.n}",
                            f"{param}.n")
