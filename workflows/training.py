"""``alignserve train``: rollouts on the engine, guide models trained on them, the Q-sharp rounds.

A work directory (``--out``) collects what a user trains for one base model:

    OUT/rollouts-r1.jsonl        round-1 rollouts (base roll-in)
    OUT/rollouts-r2.jsonl        round-2 rollouts (roll-in with the round-1 guided policy)
    OUT/rollouts-r1.summary.json their summary, with what labelled them (a verifier or a reward model)
    OUT/value-r1/, OUT/value-r2/ guide-model directories, each with its guide_card.json
    OUT/expert/, OUT/expert-reference/  an expert (``train expert``) and its backbone before tuning
    OUT/guides.json              {name: directory}: serve with --guide-models OUT/guides.json

Each stage whose output exists is skipped, and an interrupted fit resumes from its last
checkpoint (``OUT/.state/<name>.pt``), so re-running a command continues it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from transformers import AutoTokenizer

from guidance.catalog import GuideCatalog
from guidance.loading import check_tokenizers, tokenizer_difference
from models.training.guides import Backbone, GuideRecipe, save_guide, save_untuned, shared_features, train_guide
from models.training.rollouts import (
    RolloutRecord,
    informative_groups,
    read_rollouts,
    to_tensors,
    write_rollouts,
)
from server.engine import Engine
from server.prompts import PromptRenderer
from server.settings import Settings
from workflows.prompt_file import read_prompts, require_answers
from workflows.guide_names import reference_name
from workflows.labels import Labeller, binary
from workflows.rollouts import LabelledRollouts, RolloutSettings, generate_rollouts

logger = logging.getLogger(__name__)

GUIDES_TABLE = "guides.json"
STATE_DIR = ".state"
RIGHT_REWARD = 1.0  # the verifier's reward of a right rollout: the expert's training data


@dataclass(frozen=True)
class EngineOptions:
    """The vLLM engine that samples rollouts (as ``alignserve serve`` would run it)."""

    max_model_len: int = 512
    max_num_seqs: int = 128
    kv_cache_space_gib: float = 1.0
    seed: int = 0


class TokenizerMismatch(ValueError):
    pass


def check_same_tokenizer(base: Path, other: Path) -> None:
    """Refuse a backbone whose tokenizer differs from the base model's: the guide scores the base's ids."""
    try:
        difference = tokenizer_difference(base, other)
    except (OSError, ValueError) as exc:
        raise TokenizerMismatch(f"--init-from {other}: no tokenizer there ({exc})") from exc
    if difference is not None:
        raise TokenizerMismatch(f"--init-from {other} uses a different tokenizer from the base model {base} "
                                f"({difference}); a guide model must share the base's tokenizer")


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def write_table_entry(out: Path, name: str, directory: Path) -> None:
    """Add ``name -> directory`` (relative to ``out``) to ``out/guides.json``."""
    table_file = out / GUIDES_TABLE
    table = json.loads(table_file.read_text()) if table_file.is_file() else {}
    table[name] = str(directory.relative_to(out))
    table_file.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


# Rollouts.

async def _sample(base: Path, prompts_file: Path, labeller: Labeller, settings: RolloutSettings,
                  engine_options: EngineOptions, guide_table: Path | None, rollin_guidance: Sequence[dict[str, Any]],
                  round_name: str, progress: bool) -> LabelledRollouts:
    prompts = read_prompts(prompts_file)
    if labeller.verifier is not None and labeller.verifier.needs_reference:
        require_answers(prompts, labeller.verifier.name)
    serve_settings = Settings(model=base, guide_models=guide_table, max_model_len=engine_options.max_model_len,
                              max_num_seqs=engine_options.max_num_seqs, seed=engine_options.seed,
                              kv_cache_space_gib=engine_options.kv_cache_space_gib)
    catalog = GuideCatalog.from_paths(serve_settings.guide_model_paths())
    check_tokenizers(base, catalog)
    engine = Engine.start(serve_settings, catalog)
    try:
        return await generate_rollouts(engine, PromptRenderer.load(base), labeller.scorer, prompts, settings,
                                       round_name, rollin_guidance, progress)
    finally:
        engine.shutdown()


def sample_rollouts(base: Path, prompts_file: Path, labeller: Labeller, out_file: Path,
                    settings: RolloutSettings = RolloutSettings(), engine_options: EngineOptions = EngineOptions(),
                    guide_table: Path | None = None, rollin_guidance: Sequence[dict[str, Any]] = (),
                    round_name: str = "r1", progress: bool = True) -> dict[str, Any]:
    """Sample and label rollouts into ``out_file`` and their summary beside it (``summary_file``); returns
    the summary: the label source, the rollouts a verifier failed on (scored 0) or those dropped because
    the reward model's call failed (``workflows.rollouts``)."""
    started = time.perf_counter()
    verifier = labeller.verifier
    errors_before = verifier.errors if verifier is not None else 0
    labelled = asyncio.run(_sample(base, prompts_file, labeller, settings, engine_options, guide_table,
                                   rollin_guidance, round_name, progress))
    records = labelled.records
    write_rollouts(records, out_file)
    if verifier is not None:
        errors = {"verifier_errors": verifier.errors - errors_before}
        if errors["verifier_errors"]:
            logger.warning("verifier %r failed on %d of %d rollouts; they were labelled 0", verifier.name,
                           errors["verifier_errors"], len(records))
    else:
        errors = {"reward_model_errors": labelled.unscored, "reward_model_failed_calls": labelled.failed_calls}
        if labelled.unscored:
            logger.warning("reward model %r failed on %d prompts; their %d rollouts were dropped (not labelled)",
                           labeller.scorer.name, labelled.failed_calls, labelled.unscored)
    summary = {**rollout_summary(records), "labels": labeller.source, **errors,
               "seconds": round(time.perf_counter() - started, 1), "rollin_guidance": list(rollin_guidance),
               "settings": asdict(settings)}
    summary_file(out_file).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summary_file(rollout_file: Path) -> Path:
    """Where a rollout file's summary is written: ``rollouts-r1.jsonl`` -> ``rollouts-r1.summary.json``."""
    return rollout_file.with_suffix(".summary.json")


def rollout_summary(records: Sequence[RolloutRecord]) -> dict[str, Any]:
    groups = {r.group for r in records}
    kept = informative_groups(records)
    rewards = [r.reward for r in records]
    return {
        "rollouts": len(records),
        "prompts": len(groups),
        # a verifier's right/wrong: the fraction right; a reward model's scores: their mean
        "pass_at_1" if binary(rewards) else "mean_reward": round(sum(rewards) / max(1, len(records)), 4),
        "informative_prompts": len({r.group for r in kept}),
        "informative_rollouts": len(kept),
        "completion_tokens": sum(len(r.completion_ids) for r in records),
    }


# Training.

def split_groups(records: Sequence[RolloutRecord], validation_fraction: float, seed: int
                 ) -> tuple[list[RolloutRecord], list[RolloutRecord]]:
    """(training, validation) records: a seeded ``validation_fraction`` of the prompt groups, whole."""
    groups = sorted({r.group for r in records})
    random.Random(seed).shuffle(groups)
    valid = set(groups[: max(1, round(len(groups) * validation_fraction))]) if validation_fraction > 0 else set()
    return [r for r in records if r.group not in valid], [r for r in records if r.group in valid]


@dataclass(frozen=True)
class ValueHead:
    """``train value``'s head, chosen on the training rollouts' labels. A verifier's 0 or 1: ``type``
    (default bernoulli; histogram: ``atoms`` evenly spaced on [0, 1]). Other labels (a reward model's
    scores) are no probability: the histogram head, its ``atoms`` evenly spaced from the lowest to the
    highest training reward (Q-sharp's distributional head); bernoulli is refused."""

    type: str | None = None  # --head; None: by the labels
    atoms: int = 11  # --atoms

    def config(self, rewards: Sequence[float]) -> dict[str, Any]:
        if binary(rewards):
            low, high, kind = 0.0, 1.0, self.type or "bernoulli"
        elif self.type == "bernoulli":
            raise ValueError(f"--head bernoulli regresses onto labels in {{0, 1}}, and these rollouts' rewards span "
                             f"[{min(rewards):g}, {max(rewards):g}] (a reward model's scores): use --head histogram")
        else:
            low, high, kind = min(rewards), max(rewards), "histogram"
        if kind == "bernoulli":
            return {"type": "bernoulli"}
        return {"type": "histogram", "atoms": [low + (high - low) * i / (self.atoms - 1) for i in range(self.atoms)]}


def label_source(rollout_files: Sequence[Path]) -> dict[str, Any] | None:
    """What labelled the rollout files, as their summaries record it (None: no summary says); ValueError
    when they differ (rewards on different scales do not mix)."""
    sources: list[dict[str, Any]] = []
    for file in map(summary_file, rollout_files):
        source = json.loads(file.read_text()).get("labels") if file.is_file() else None
        if source is not None and source not in sources:
            sources.append(source)
    if len(sources) > 1:
        raise ValueError(f"the rollout files were labelled by different sources ({sources}); train on one's")
    return sources[0] if sources else None


def train_from_rollouts(base: Path, rollout_files: Sequence[Path], recipe: GuideRecipe, backbone: Backbone,
                        out: Path, seed: int = 0, validation_fraction: float = 0.1,
                        progress: bool = True, value_head: ValueHead | None = None) -> dict[str, Any]:
    """Train ``recipe`` on the aggregated rollouts of ``rollout_files`` and write ``out/<name>``
    (and its ``guides.json`` entry); returns the guide's card. An expert (the likelihood objective) trains
    on the right rollouts only (rejection-sampling fine-tuning), and its reference, the backbone before
    tuning, is written beside it as ``out/<name>-reference``. ``value_head`` (``train value``) chooses the
    recipe's head on the training labels. Pairs and experts need a verifier's right/wrong labels."""
    if backbone.init_from.resolve() != base.resolve():
        check_same_tokenizer(base, backbone.init_from)
    labels = label_source(rollout_files)
    records = [r for file in rollout_files for r in read_rollouts(file)]
    if recipe.objective != "value" and not binary([r.reward for r in records]):
        raise ValueError(f"{recipe.name}: the {recipe.objective} objective reads right/wrong labels (0 or 1), and "
                         f"these rollouts have other rewards (labels: {labels}); train value or prefix on them")
    if recipe.objective == "value":  # Q-sharp: prompts whose samples all agree carry no signal
        records = informative_groups(records)
        unusable = "every prompt's samples had the same reward"
    elif recipe.objective == "likelihood":
        records = [r for r in records if r.reward == RIGHT_REWARD]
        unusable = f"no rollout has reward {RIGHT_REWARD}"
    else:
        unusable = "the files hold no rollouts"
    if not records:
        raise ValueError(f"{recipe.name}: no usable rollouts in {[str(f) for f in rollout_files]} ({unusable})")
    train_records, valid_records = split_groups(records, validation_fraction, seed)
    if value_head is not None:
        recipe = replace(recipe, head={**recipe.head, **value_head.config([r.reward for r in train_records])})
    pad_id = AutoTokenizer.from_pretrained(base).pad_token_id or 0
    data = {"train": to_tensors(train_records, pad_id), "valid": to_tensors(valid_records, pad_id)}
    started = time.perf_counter()
    decoder, features = shared_features(backbone, [recipe], data)
    feature_seconds = time.perf_counter() - started
    depth = decoder.config.num_hidden_layers - recipe.trainable_layers
    state = out / STATE_DIR / f"{recipe.name}.pt"
    model, card = train_guide(recipe, backbone, data, features[depth], seed, progress, checkpoint=state)
    card = {
        "name": recipe.name,
        "base": str(base),
        "rollouts": {"files": [str(f) for f in rollout_files], "train": len(train_records),
                     "validation": len(valid_records), **rollout_summary(records)},
        "labels": labels,
        "seed": seed,
        **card,
        "feature_seconds": round(feature_seconds, 1),
    }
    if recipe.objective == "likelihood":
        card["reference"] = reference_name(recipe.name)
    if is_rank_zero():
        save_guide(model, backbone, base, out / recipe.name, card)
        write_table_entry(out, recipe.name, out / recipe.name)
        if recipe.objective == "likelihood":
            reference = reference_name(recipe.name)
            save_untuned(backbone, base, out / reference, {
                "name": reference, "base": str(base), "reference_of": recipe.name,
                "backbone": {key: card["backbone"][key] for key in ("init_from", "layers")},
                "objective": "none: the backbone before tuning",
                "validation": card["untuned_validation"]})
            write_table_entry(out, reference, out / reference)
        state.unlink(missing_ok=True)
    return card


def value_rounds(base: Path, prompts_file: Path, labeller: Labeller, recipe: GuideRecipe, backbone: Backbone,
                 out: Path, rounds: int, rollin_strength: float, settings: RolloutSettings,
                 engine_options: EngineOptions, seed: int = 0, validation_fraction: float = 0.1,
                 progress: bool = True, rollin_samples: int | None = None,
                 value_head: ValueHead | None = None) -> list[dict[str, Any]]:
    """The Q-sharp loop: round k rolls in with the round k-1 guided policy (qsharp at
    ``rollin_strength``; ``rollin_samples`` per prompt, default ``settings.samples``), rolls out
    with the base, and retrains from scratch on the rollouts of rounds 1..k; writes
    ``out/<name>-r<k>``. Stages already done are skipped."""
    out.mkdir(parents=True, exist_ok=True)
    cards, files = [], []
    for k in range(1, rounds + 1):
        rollout_file = out / f"rollouts-r{k}.jsonl"
        if not rollout_file.is_file():
            rollin = () if k == 1 else (
                {"type": "qsharp", "model": f"{recipe.name}-r{k - 1}", "strength": rollin_strength},)
            samples = settings.samples if k == 1 else rollin_samples or settings.samples
            round_settings = replace(settings, samples=samples, seed=settings.seed + 1_000_003 * k)
            sample_rollouts(base, prompts_file, labeller, rollout_file, round_settings, engine_options,
                            out / GUIDES_TABLE if k > 1 else None, rollin, f"r{k}", progress)
        files.append(rollout_file)
        round_recipe = replace(recipe, name=f"{recipe.name}-r{k}")
        card_file = out / round_recipe.name / "guide_card.json"
        if card_file.is_file():
            cards.append(json.loads(card_file.read_text()))
            continue
        cards.append(train_from_rollouts(base, files, round_recipe, backbone, out, seed, validation_fraction,
                                         progress, value_head))
    return cards
