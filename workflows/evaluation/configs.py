"""Evaluated configurations, and the JSON file that lists them (``alignserve eval --configs FILE``).

The file is a list of objects:

    [{"name": "qsharp@4", "method": "qsharp", "strength": 4,
      "guidance": [{"type": "qsharp", "model": "my-value", "strength": 4}]},
     {"name": "bo8-value", "method": "best-of-n", "strength": 8,
      "search": {"type": "best_of_n", "n": 8, "scorer": "my-value"}}]

``name`` is unique (``base`` is reserved: the unguided base is always run); ``method`` is the
curve the configuration belongs to in the plot; ``strength`` (number or null) is its place on
that curve; ``guidance`` (a list of entries) and/or ``search`` (one object) are sent as they
are with every request (docs/guidance.md). The server checks the entries' contents; this
module checks what the evaluation itself reads: the search type and its candidate counts,
which decide the seeds each sample uses and how its KL is estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_NAME = "base"
SEARCH_COUNTS = {"best_of_n": ("n",), "blockwise": ("candidates", "block_tokens"), "beam": ("beam_width", "expansions"),
                 "dvts": ("n", "beam_width"), "particle_filter": ("particles",)}
STEP_SEARCHES = ("beam", "dvts", "particle_filter")
DEFAULT_MAX_STEPS = 32  # the server's default max_steps of a step-level search
CONFIG_FIELDS = {"name", "method", "strength", "guidance", "search"}


class ConfigError(ValueError):
    """An invalid configuration; the message names the file and the field."""


@dataclass(frozen=True)
class EvalConfig:
    """One configuration: every prompt's samples are requested with ``extension`` added to the body."""

    name: str
    method: str
    strength: float | None = None
    guidance: tuple[dict[str, Any], ...] = ()
    search: dict[str, Any] | None = field(default=None)

    @property
    def extension(self) -> dict[str, Any]:
        """The request fields this configuration adds: ``guidance`` and/or ``search``."""
        body: dict[str, Any] = {}
        if self.guidance:
            body["guidance"] = [dict(entry) for entry in self.guidance]
        if self.search is not None:
            body["search"] = dict(self.search)
        return body

    @property
    def search_type(self) -> str | None:
        return None if self.search is None else self.search["type"]

    @property
    def candidates_per_step(self) -> int:
        """Engine requests one sample's search runs at once (1 without search): N of best-of-N, the
        candidates of a block, beam_width x expansions, DVTS's n, the particles."""
        search = self.search or {}
        counts = {"best_of_n": "n", "blockwise": "candidates", "dvts": "n", "particle_filter": "particles"}
        if search.get("type") == "beam":
            return search["beam_width"] * search["expansions"]
        return search[counts[search["type"]]] if search else 1

    @property
    def kl_budget(self) -> float | None:
        """The request's ``max_kl``: the smallest its guidance entries give (the server's rule), None without."""
        budgets = [float(entry["max_kl"]) for entry in self.guidance if entry.get("max_kl") is not None]
        return min(budgets) if budgets else None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "strength": self.strength, **self.extension}


BASE = EvalConfig(name=BASE_NAME, method=BASE_NAME)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_search(search: Any, where: str) -> None:
    if not isinstance(search, dict):
        raise ConfigError(f"{where}.search: must be an object, got {type(search).__name__}")
    kind = search.get("type")
    if kind not in SEARCH_COUNTS:
        raise ConfigError(f"{where}.search.type: must be one of {sorted(SEARCH_COUNTS)}, got {kind!r}")
    for count in SEARCH_COUNTS[kind]:
        if not _positive_int(search.get(count)):
            raise ConfigError(f"{where}.search.{count}: must be a positive integer, got {search.get(count)!r}")
    temperature = search.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"{where}.search.temperature: must be a number >= 0, got {temperature!r}")


def parse_config(body: Any, where: str) -> EvalConfig:
    """One configuration object; ConfigError naming ``where`` and the bad field."""
    if not isinstance(body, dict):
        raise ConfigError(f"{where}: must be an object, got {type(body).__name__}")
    if unknown := sorted(body.keys() - CONFIG_FIELDS):
        raise ConfigError(f"{where}: unknown fields {unknown}; allowed: {sorted(CONFIG_FIELDS)}")
    for name in ("name", "method"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise ConfigError(f"{where}.{name}: must be a non-empty string, got {body.get(name)!r}")
    if body["name"] == BASE_NAME:
        raise ConfigError(f"{where}.name: {BASE_NAME!r} is reserved for the unguided base, which is always run")
    strength = body.get("strength")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
        raise ConfigError(f"{where}.strength: must be a number or null, got {strength!r}")
    guidance = body.get("guidance", [])
    if not isinstance(guidance, list) or not all(isinstance(entry, dict) for entry in guidance):
        raise ConfigError(f"{where}.guidance: must be a list of objects, got {guidance!r}")
    search = body.get("search")
    if search is not None:
        _check_search(search, where)
    if not guidance and search is None:
        raise ConfigError(f"{where}: give 'guidance' and/or 'search' (the unguided base is always run)")
    return EvalConfig(name=body["name"], method=body["method"],
                      strength=None if strength is None else float(strength),
                      guidance=tuple(guidance), search=search)


def read_config_file(path: Path) -> list[EvalConfig]:
    """The configurations in ``path`` (a JSON list); ConfigError naming the file and field."""
    try:
        body = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--configs {path}: {exc}") from exc
    if not isinstance(body, list) or not body:
        raise ConfigError(f"--configs {path}: must be a non-empty JSON list of configurations")
    return [parse_config(entry, f"--configs {path}: [{i}]") for i, entry in enumerate(body)]


def check_unique(configs: list[EvalConfig]) -> None:
    """ConfigError naming the first configuration name used twice."""
    seen: set[str] = set()
    for config in configs:
        if config.name in seen:
            raise ConfigError(f"configuration name {config.name!r} is used twice")
        seen.add(config.name)
