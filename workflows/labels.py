"""What labels rollouts: a verifier, or a reward model of the guide-model table.

Both are sequence scorers (``guidance.search.scorers``): a verifier is wrapped as the server's
best-of-N wraps it, and ``--reward-model NAME`` is any sequence scorer of the table as the server
loads it (``server.table_scorers``): a guide model with a sequence-scoring head, an off-the-shelf
``*ForSequenceClassification`` reward model or PRM, or a pooling server reached by URL. A rollout's
label is the scorer's score of its whole completion.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guidance.search.scorers import Scorer, VerifierScorer
from guidance.verifiers import RegisteredVerifier, resolve_verifier, verifier_names
from server.settings import Settings
from server.table_scorers import load_table_scorers


@dataclass(frozen=True)
class Labeller:
    scorer: Scorer
    source: dict[str, Any]  # recorded in the rollout summary and the guide card

    @property
    def verifier(self) -> RegisteredVerifier | None:
        return self.scorer.verifier if isinstance(self.scorer, VerifierScorer) else None


def verifier_labeller(spec: str) -> Labeller:
    """Labels by ``--verifier``: a registered name or ``module:function``."""
    verifier = resolve_verifier(spec)
    return Labeller(VerifierScorer(verifier.name, verifier), {"verifier": verifier.name})


@contextmanager
def reward_model_labeller(name: str, base: Path, guide_models: Path | None,
                          environ: Mapping[str, str]) -> Iterator[Labeller]:
    """Labels by ``--reward-model NAME``, a sequence scorer of the ``--guide-models`` table (for the demo
    base, the demo's table by default, as ``serve`` reads it), loaded alone; ValueError naming the flag."""
    if name in verifier_names():
        raise ValueError(f"--reward-model {name!r} is a verifier: give it as --verifier {name}")
    settings = Settings(model=base, guide_models=guide_models)
    table_file = settings.guide_table_file()
    if table_file is None:
        raise ValueError(f"--reward-model {name!r} needs --guide-models FILE, the guide-model table that lists it")
    table = settings.guide_table()
    if name not in table:
        raise ValueError(f"--reward-model: {table_file} has no entry {name!r} "
                         f"(its entries: {', '.join(sorted(table))})")
    loaded = load_table_scorers(settings, environ, only=name)
    try:
        if name not in loaded.scorers:
            raise ValueError(f"--reward-model: {name!r} in {table_file} does not score whole sequences "
                             f"(head {loaded.catalog[name].head_type!r}, scoring {loaded.catalog[name].scoring!r})")
        scorer = loaded.scorers[name]
        yield Labeller(scorer, {"reward_model": name, "describe": scorer.describe()})
    finally:
        loaded.close()


def binary(rewards: Sequence[float]) -> bool:
    """Whether labels are a verifier's right/wrong, all in {0, 1}."""
    return all(r in (0.0, 1.0) for r in rewards)
