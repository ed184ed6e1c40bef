"""Guide-table entries naming an off-the-shelf reward model directory, used as a scorer as it is.

    {"rm":  {"path": "skywork-rm", "kind": "reward_model"}}
    {"prm": {"path": "qwen2.5-math-prm-7b", "kind": "prm"}}
    {"ms":  {"path": "math-shepherd", "kind": "prm", "step_tag": "ки", "labels": ["+", "-"],
             "step_delimiter": "\\n"}}

``kind`` and the checkpoint's ``config.json`` ``architectures`` decide the form
(``models.runtime.hf_reward``):

- ``reward_model``: a ``*ForSequenceClassification`` with one label;
- ``prm`` on ``Qwen2ForProcessRewardModel`` (Qwen2.5-Math-PRM): its separator ``<extra_0>`` is the
  default ``step_tag``; it has no ``labels`` (the two-class head is read);
- ``prm`` on a ``*ForCausalLM`` (Math-Shepherd): ``step_tag`` and ``labels`` ([good, bad] tokens)
  are required.

``step_delimiter`` (default a blank line) is where a whole completion is cut into steps. Reading an
entry touches only JSON files; ValueError names the entry and the field (``prm.step_tag: ...``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from guidance.search.scorers import DEFAULT_STEP_DELIMITER
from models.runtime.hf_reward import QWEN_PRM_ARCHITECTURE

QWEN_STEP_TAG = "<extra_0>"
ScorerForm = Literal["classifier", "qwen_prm", "tagged_lm"]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(min_length=1, description="The checkpoint directory (relative to the guide table).")


class RewardModelEntry(_Entry):
    kind: Literal["reward_model"]


class ProcessRewardEntry(_Entry):
    kind: Literal["prm"]
    step_tag: str | None = Field(None, min_length=1, description="The token after each step whose score is read.")
    labels: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, min_length=2, max_length=2, description="[good, bad] label tokens of a causal-LM PRM.")
    step_delimiter: str = Field(DEFAULT_STEP_DELIMITER, min_length=1, description="Where completions are cut into steps.")


ENTRY_KINDS: dict[str, type[_Entry]] = {"reward_model": RewardModelEntry, "prm": ProcessRewardEntry}


@dataclass(frozen=True)
class ScorerModelSpec:
    """A validated entry: which checkpoint, read how."""

    name: str
    path: Path
    kind: str  # "reward_model" | "prm"
    architecture: str
    form: ScorerForm
    step_tag: str | None = None
    labels: tuple[str, str] | None = None
    step_delimiter: str | None = None


def read_scorer_entry(name: str, entry: Any) -> ScorerModelSpec:
    """A table entry with a ``path`` as a ScorerModelSpec; ValueError naming the entry and the field."""
    if not isinstance(entry, dict):
        raise ValueError(f"{name}: an entry must be a directory name or an object")
    kind = entry.get("kind")
    if kind is None:
        raise ValueError(f"{name}.kind: Field required (one of {', '.join(map(repr, ENTRY_KINDS))}; "
                         "an entry with a url is a remote scorer)")
    if kind not in ENTRY_KINDS:
        raise ValueError(f"{name}.kind: must be one of {', '.join(map(repr, ENTRY_KINDS))}, got {kind!r}")
    try:
        parsed = ENTRY_KINDS[kind].model_validate(entry)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "entry"
        raise ValueError(f"{name}.{field}: {error['msg'].removeprefix('Value error, ')}") from None
    path = Path(parsed.path)
    architecture = _architecture(name, path)
    if isinstance(parsed, RewardModelEntry):
        return ScorerModelSpec(name, path, kind, architecture, _classifier_form(name, path, architecture))
    return _prm_spec(name, path, architecture, parsed)


def _architecture(name: str, path: Path) -> str:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{name}.path: {path} is not a model directory (no readable config.json: {exc})") from None
    architectures = config.get("architectures") or []
    if len(architectures) != 1:
        raise ValueError(f"{name}.path: {path}/config.json must name one architecture, got {architectures}")
    # transformers' default is two labels when config.json lists none.
    labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels") or 2
    if architectures[0].endswith("ForSequenceClassification") and labels != 1:
        raise ValueError(f"{name}.path: {path} is a classifier with {labels} labels; a reward model has one")
    return str(architectures[0])


def _classifier_form(name: str, path: Path, architecture: str) -> ScorerForm:
    if not architecture.endswith("ForSequenceClassification"):
        raise ValueError(f"{name}.kind: 'reward_model' needs a *ForSequenceClassification checkpoint; {path} is "
                         f"{architecture}" + (" (kind 'prm')" if architecture == QWEN_PRM_ARCHITECTURE else ""))
    return "classifier"


def _prm_spec(name: str, path: Path, architecture: str, entry: ProcessRewardEntry) -> ScorerModelSpec:
    if architecture == QWEN_PRM_ARCHITECTURE:
        if entry.labels is not None:
            raise ValueError(f"{name}.labels: a {QWEN_PRM_ARCHITECTURE} reads its two-class head, not label tokens; "
                             "remove labels")
        return ScorerModelSpec(name, path, "prm", architecture, "qwen_prm", entry.step_tag or QWEN_STEP_TAG, None,
                               entry.step_delimiter)
    if not architecture.endswith("ForCausalLM"):
        raise ValueError(f"{name}.kind: 'prm' needs a {QWEN_PRM_ARCHITECTURE} or a *ForCausalLM checkpoint read at "
                         f"a step tag; {path} is {architecture}")
    if entry.step_tag is None:
        raise ValueError(f"{name}.step_tag: Field required for a causal-LM PRM (the token after each step, "
                         "e.g. \"ки\" for Math-Shepherd)")
    if entry.labels is None:
        raise ValueError(f"{name}.labels: Field required for a causal-LM PRM ([good, bad] label tokens, "
                         "e.g. [\"+\", \"-\"] for Math-Shepherd)")
    return ScorerModelSpec(name, path, "prm", architecture, "tagged_lm", entry.step_tag, tuple(entry.labels),
                           entry.step_delimiter)
