"""The usual sweep, built from guide-model and scorer names given on the command line.

    --qsharp my-value --cd my-prefix --strengths 0.5,1,2,4,8   per-step guidance, one config per strength
    --contrast my-expert                                        contrast of my-expert and my-expert-reference
    --arm my-arm@0.25,0.5,1                                     a model's own strengths (after '@')
    --best-of-n alignserve-verifier my-value --n 1,2,4,8,16     best-of-N, one config per N
    --blockwise my-prefix --block-candidates 4 --block-tokens 4 blockwise CD, one config per candidate count
    --prune my-value --prune-every 8 --prune-fraction 0.5       also pruned best-of-N, per scorer and N >= 2
    --step-search my-prm --expansions 4                         beam, DVTS and particle filtering per N (budget)
    --answers math                                              weighted-majority picks (also a best-of-N curve)
    --min-entropy 0.5,1                                         also entropy-gated variants of per-step configs
    --kl-budgets 0.25,0.5,1,2                                   per-step guidance at each KL budget (max_kl)

Each guide model or scorer is one curve (``method``): ``qsharp(my-value)``, ``best-of-n(my-value)``,
``blockwise(my-prefix)``, ``beam(my-prm)``; the strength of a point is the guidance strength, N, the
candidates per block, or a step-level search's budget B, its candidates per step: beam keeps B / E
solutions of E expansions each (B a multiple of E = ``--expansions``), DVTS runs B / E subtrees of E
expansions (search-and-learn's n = B, beam_width = E), particle filtering carries B particles. Pruned best-of-N is a curve of its own, ``best-of-n(my-value) pruned(v)``,
and so is each gate, ``qsharp(my-value) H>=0.5``.

With KL budgets each per-step guide model is also run once per budget B, its entry
``{"type": ..., "model": ..., "max_kl": B}`` with no strength (the server's cap, 1000), so the
budget alone sets the strength: the curve ``qsharp(my-value) max_kl``, point ``qsharp(my-value)
max_kl=B``. The default strength grid is then not run; strengths given (``--strengths``,
``MODEL@S``) still are. ``budget_variants`` does the same for a configuration of a file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workflows.evaluation.configs import EvalConfig
from workflows.guide_names import reference_name

# Per-step guidance flags: --qsharp, --cd, --arm, --genarm, --contrast set entries of these module types.
GUIDED_METHODS = ("qsharp", "cd", "arm", "genarm", "contrast")
DEFAULT_STRENGTHS = (0.5, 1.0, 2.0, 4.0, 8.0)
DEFAULT_NS = (1, 2, 4, 8, 16)
DEFAULT_BLOCK_CANDIDATES = (4,)
DEFAULT_BLOCK_TOKENS = 4


@dataclass(frozen=True)
class GuideModel:
    """A guide model named on the command line, with its own strengths (None: ``--strengths``)."""

    model: str
    strengths: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Sweep:
    guided: dict[str, tuple[GuideModel, ...]] = field(default_factory=dict)  # guidance type -> models
    strengths: tuple[float, ...] | None = None  # None: DEFAULT_STRENGTHS, or none with kl_budgets
    best_of_n: tuple[str, ...] = ()  # scorers
    ns: tuple[int, ...] = DEFAULT_NS
    blockwise: tuple[str, ...] = ()  # scorers
    block_candidates: tuple[int, ...] = DEFAULT_BLOCK_CANDIDATES
    block_tokens: int = DEFAULT_BLOCK_TOKENS
    prune: dict | None = None  # best-of-N's `prune` object, for the pruned variants
    min_entropies: tuple[float, ...] = ()  # gates of the per-step variants
    kl_budgets: tuple[float, ...] = ()  # max_kl of the budgeted per-step variants
    step_search: tuple[str, ...] = ()  # scorers of beam, DVTS and particle filtering
    expansions: int = 4  # E: beam's expansions per kept solution, DVTS's beam_width
    step_fields: dict = field(default_factory=dict)  # step_delimiter, max_steps, aggregate of the step searches
    answers: str | None = None  # weighted-majority picks by this verifier's answers
    contrast_reference: str | None = None  # reference of every --contrast expert; None: the expert's own

    def strengths_of(self, guide: GuideModel) -> tuple[float, ...]:
        """The fixed strengths a guide model is run at (module docstring)."""
        if guide.strengths is not None:
            return guide.strengths
        if self.strengths is not None:
            return self.strengths
        return () if self.kl_budgets else DEFAULT_STRENGTHS


def parse_strengths(text: str) -> tuple[float, ...]:
    """``"0.5,1,2"`` -> (0.5, 1.0, 2.0); ValueError unless every item is a number >= 0."""
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a number (expected e.g. 0.5,1,2)") from None
        if not value >= 0:
            raise ValueError(f"strength {item.strip()} must be >= 0")
        values.append(value)
    return tuple(values)


def parse_counts(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4); ValueError unless every item is an integer >= 1."""
    values = []
    for item in text.split(","):
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an integer (expected e.g. 1,2,4,8)") from None
        if value < 1:
            raise ValueError(f"{value} must be at least 1")
        values.append(value)
    return tuple(values)


def parse_kl_budgets(text: str) -> tuple[float, ...]:
    """``"0.25,0.5,1"`` -> (0.25, 0.5, 1.0); ValueError unless every item is a finite number > 0, given once."""
    values: list[float] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not a number (expected nats, e.g. 0.25,0.5,1,2)") from None
        if not 0 < value < math.inf:
            raise ValueError(f"budget {item.strip()} must be a finite number > 0 (nats per response)")
        if value in values:
            raise ValueError(f"budget {item.strip()} is given twice")
        values.append(value)
    return tuple(values)


def parse_guide_model(text: str) -> GuideModel:
    """``"MODEL"`` or ``"MODEL@1,2,4"`` (that model's own strengths)."""
    model, at, strengths = text.partition("@")
    if not model:
        raise ValueError(f"{text!r}: give a guide-model name (MODEL or MODEL@STRENGTHS)")
    return GuideModel(model, parse_strengths(strengths) if at else None)


def budget_variants(config: EvalConfig, budgets: tuple[float, ...]) -> list[EvalConfig]:
    """``config`` once per budget B, each of its guidance entries given ``max_kl`` B (their strengths
    stay: caps, and the shares of a composition), on a curve of their own, ``NAME max_kl``; [] for a
    configuration with a search, without guidance, or with a budget already."""
    if config.search is not None or not config.guidance or any(
            entry.get(name) is not None for entry in config.guidance for name in ("max_kl", "kl_per_token")):
        return []
    return [EvalConfig(name=f"{config.name} max_kl={budget:g}", method=f"{config.name} max_kl",
                       strength=config.strength,
                       guidance=tuple({**entry, "max_kl": budget} for entry in config.guidance))
            for budget in budgets]


def _guided(method: str, guide: GuideModel, sweep: Sweep, min_entropy: float) -> list[EvalConfig]:
    gate, suffix = ({"min_entropy": min_entropy}, f" H>={min_entropy:g}") if min_entropy else ({}, "")
    label = f"{method}({guide.model})"
    entry = {"type": method, "model": guide.model, **gate}
    if method == "contrast":
        entry["reference"] = sweep.contrast_reference or reference_name(guide.model)
    fixed = [EvalConfig(name=f"{label}@{strength:g}{suffix}", method=label + suffix, strength=strength,
                        guidance=({**entry, "strength": strength},))
             for strength in sweep.strengths_of(guide)]
    budgeted = [EvalConfig(name=f"{label}{suffix} max_kl={budget:g}", method=f"{label}{suffix} max_kl",
                           guidance=({**entry, "max_kl": budget},))
                for budget in sweep.kl_budgets]
    return fixed + budgeted


def sweep_configs(sweep: Sweep) -> list[EvalConfig]:
    """The configurations of ``sweep``, per-step methods first, then best-of-N, then blockwise."""
    configs = [config for method in GUIDED_METHODS for guide in sweep.guided.get(method, ())
               for gate in (0.0, *sweep.min_entropies) for config in _guided(method, guide, sweep, gate)]
    configs += [EvalConfig(name=f"best-of-{n}({scorer})", method=f"best-of-n({scorer})", strength=float(n),
                           search={"type": "best_of_n", "n": n, "scorer": scorer})
                for scorer in sweep.best_of_n for n in sweep.ns]
    if sweep.prune is not None:
        label = f"pruned({sweep.prune['scorer']})"
        configs += [EvalConfig(name=f"best-of-{n}({scorer}) {label}", method=f"best-of-n({scorer}) {label}",
                               strength=float(n), search={"type": "best_of_n", "n": n, "scorer": scorer,
                                                          "prune": dict(sweep.prune)})
                    for scorer in sweep.best_of_n for n in sweep.ns if n >= 2]
    configs += [EvalConfig(name=f"blockwise-{k}x{sweep.block_tokens}({scorer})", method=f"blockwise({scorer})",
                           strength=float(k), search={"type": "blockwise", "candidates": k,
                                                      "block_tokens": sweep.block_tokens, "scorer": scorer})
                for scorer in sweep.blockwise for k in sweep.block_candidates]
    if sweep.answers is not None:
        configs += [EvalConfig(name=f"weighted-best-of-{n}({scorer})", method=f"weighted-best-of-n({scorer})",
                               strength=float(n), search={"type": "best_of_n", "n": n, "scorer": scorer,
                                                          "answers": sweep.answers})
                    for scorer in sweep.best_of_n for n in sweep.ns if n >= 2]
    return configs + [config for scorer in sweep.step_search for config in _step_searches(scorer, sweep)]


def _step_searches(scorer: str, sweep: Sweep) -> list[EvalConfig]:
    """Beam, DVTS and particle filtering by `scorer` at each budget N (module docstring)."""
    common = {"scorer": scorer, **sweep.step_fields, **({"answers": sweep.answers} if sweep.answers else {})}
    width = sweep.expansions
    searches = {"beam": lambda b: {"beam_width": b // width, "expansions": width} if b % width == 0 else None,
                "dvts": lambda b: {"n": b, "beam_width": width} if b % width == 0 else None,
                "particle_filter": lambda b: {"particles": b}}
    return [EvalConfig(name=f"{kind}-{budget}({scorer})", method=f"{kind}({scorer})", strength=float(budget),
                       search={"type": kind, **counts, **common})
            for kind, shape in searches.items() for budget in sweep.ns if (counts := shape(budget)) is not None]
