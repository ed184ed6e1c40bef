"""The operator's table of guide models: names requests may use, and what each one is.

Built from ``{name: directory}``; ``read_guide_table`` reads the operator's table file, whose
entries are such directories or ``{"url": ...}`` scorers served by URL (``guidance.search.remote``),
which have no directory and so no place in a catalog. Reading a catalog touches only the small JSON
files (``config.json``, ``guide_head.json``), so the HTTP process can validate
requests and list models without loading weights; the engine's worker loads them.
A plain causal-LM checkpoint (no ``guide_head.json``) is an ``lm`` guide model
(``models.runtime.heads.read_head_config``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from models.runtime.heads import read_head_config


@dataclass(frozen=True)
class GuideModelInfo:
    name: str
    path: Path
    head_type: str
    scoring: str  # "q": every next token from one forward; "v": k appended candidates
    vocab_size: int
    atoms: tuple[float, ...] | None = None

    def describe(self) -> dict:
        info = {"name": self.name, "head": self.head_type, "scoring": self.scoring}
        if self.atoms is not None:
            info["atoms"] = list(self.atoms)
        return info


class GuideCatalog:
    def __init__(self, models: Mapping[str, GuideModelInfo], scorers_only: Mapping[str, str] | None = None) -> None:
        """`scorers_only`: {name: kind} of the table's models that only score (a URL, an off-the-shelf
        reward model): not guide models, named so that guidance naming one is refused clearly."""
        self._models = dict(models)
        self._scorers_only = dict(scorers_only or {})

    @classmethod
    def from_paths(cls, paths: Mapping[str, str | Path], scorers_only: Mapping[str, str] | None = None
                   ) -> "GuideCatalog":
        return cls({name: read_guide_info(name, Path(path)) for name, path in paths.items()}, scorers_only)

    @classmethod
    def from_table(cls, table_file: Path) -> "GuideCatalog":
        """The guide models of the table in `table_file` (its entries served by URL left out)."""
        return cls.from_paths(local_guide_paths(table_file))

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def scorer_kind(self, name: str) -> str | None:
        """The kind of the table's scorer-only model `name` (None for any other name)."""
        return self._scorers_only.get(name)

    def __getitem__(self, name: str) -> GuideModelInfo:
        return self._models[name]

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return sorted(self._models)

    def paths(self) -> dict[str, str]:
        return {name: str(info.path) for name, info in self._models.items()}

    def paths_by_name(self) -> dict[str, Path]:
        return {name: info.path for name, info in self._models.items()}


def read_guide_table(table_file: Path) -> dict[str, str | dict]:
    """The guide-model table in `table_file` as written: {name: directory relative to the file},
    {name: {"url": ...}} or {name: {"path": ..., "kind": ...}}; ValueError naming the file if it is none."""
    table = json.loads(table_file.read_text())
    if not isinstance(table, dict) or not all(isinstance(v, (str, dict)) for v in table.values()):
        raise ValueError(f"guide_models: {table_file} must hold a JSON object of name -> directory "
                         "(or name -> {\"url\": ...} for a scorer served by URL, or {\"path\": ..., \"kind\": ...} "
                         "for a reward model)")
    return table


def local_guide_paths(table_file: Path) -> dict[str, Path]:
    """The guide-model directories of the table in `table_file`, resolved: {name: directory}."""
    return {name: (table_file.parent / entry).resolve() for name, entry in read_guide_table(table_file).items()
            if isinstance(entry, str)}


def read_guide_info(name: str, path: Path) -> GuideModelInfo:
    """Describe the guide model in `path`; ValueError naming the model if it is not one."""
    try:
        head = read_head_config(path)
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"guide model {name!r}: {path} is not a guide-model directory ({exc})"
                         f"{_reward_model_hint(path)}") from exc
    atoms = head.get("atoms")
    return GuideModelInfo(
        name=name,
        path=path,
        head_type=head["type"],
        scoring=head.get("scoring", "q"),
        vocab_size=int(config["vocab_size"]),
        atoms=tuple(float(z) for z in atoms) if atoms is not None else None,
    )


def _reward_model_hint(path: Path) -> str:
    """How to list `path` when it is an off-the-shelf reward model rather than a guide model."""
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return ""
    if any(str(a).endswith(("ForSequenceClassification", "ForProcessRewardModel")) for a in architectures):
        return '; a reward model is listed as {"path": ..., "kind": "reward_model"} (or "prm"), a scorer'
    return ""
