"""The sequence scorers of the operator's guide-model table, loaded as the server serves them.

One loader for the server's search and ``alignserve train --reward-model``: the table's guide models
that score sequences (``guidance.search.scorers``), its off-the-shelf reward models
(``{"path": ..., "kind": ...}``, ``guidance.search.hf_scorers``) and its scorers served by URL
(``{"url": ...}``, ``guidance.search.remote``), beside the served verifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from guidance.catalog import GuideCatalog
from guidance.loading import check_tokenizers
from guidance.search.hf_entries import read_scorer_entry
from guidance.search.hf_scorers import load_hf_scorer
from guidance.search.remote import RemoteScorer, load_remote_scorers
from guidance.search.scorers import Scorer, ScorerCatalog
from server.settings import Settings


@dataclass(frozen=True)
class TableScorers:
    catalog: GuideCatalog  # the table's guide models; its scorer-only entries named, so guidance naming one is refused
    scorers: ScorerCatalog
    remote: list[RemoteScorer]
    reward_models: list[Scorer]  # off-the-shelf reward models (guidance.search.hf_scorers)

    def close(self) -> None:
        """Stop the remote scorers' connection pools."""
        for scorer in self.remote:
            scorer.close()


def load_table_scorers(settings: Settings, environ: Mapping[str, str], only: str | None = None) -> TableScorers:
    """The scorers of ``settings``' guide-model table (``environ``: where remote scorers' ``api_key_env`` are
    read); with ``only``, that entry alone is read and loaded (a trainer labels with one, and the table may
    list large models it does not need). ValueError naming the entry and field of a bad one."""
    def wanted(name: str) -> bool:
        return only is None or name == only

    specs = [read_scorer_entry(name, entry) for name, entry in settings.scorer_model_entries().items() if wanted(name)]
    remote_entries = {name: entry for name, entry in settings.remote_scorer_entries().items() if wanted(name)}
    scorers_only = {**{spec.name: spec.kind for spec in specs}, **dict.fromkeys(remote_entries, "remote")}
    catalog = GuideCatalog.from_paths({name: path for name, path in settings.guide_model_paths().items()
                                       if wanted(name)}, scorers_only)
    check_tokenizers(settings.model, catalog)
    remote = load_remote_scorers(remote_entries, environ)
    reward_models = [load_hf_scorer(spec, settings.model) for spec in specs]
    scorers = ScorerCatalog.load(catalog, remote=remote, reward_models=reward_models,
                                 code_verifiers=settings.serve_code_verifiers)
    return TableScorers(catalog, scorers, remote, reward_models)
