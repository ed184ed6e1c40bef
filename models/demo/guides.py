"""Build the demo guide models from the demo base model and a seed.

One pass of temperature-1 rollouts of the base model on training problems (never the
held-out ones; 4 samples per problem, plain and chat prompts) feeds six guide models,
each a backbone initialised from the base whose top layer is fine-tuned together with
its head, by the same trainers as ``alignserve train`` (``models.training``; its
``objectives`` module states the losses):

=============== ========== ======= ==========================================================
name            head       scoring training
=============== ========== ======= ==========================================================
demo-value      bernoulli  q       Q-sharp: BCE of every generated prefix's logit onto R
demo-value-hist histogram  v       Q-sharp, distributional: CE onto the atom of R
demo-prefix     expected   v       CD-FUDGE: MSE of every prefix (its last token included) onto R
demo-arm        arm        q       Bradley-Terry on summed token rewards, correct vs incorrect pairs
demo-genarm     lm         q       GenARM: -log sigmoid(beta (log pi_r(y_w|x) - log pi_r(y_l|x)))
demo-reward     reward     v       sequence reward model: Bradley-Terry on the last token's score, same pairs
demo-reference  lm         q       none: the base checkpoint itself, the reference of `contrast` entries
=============== ========== ======= ==========================================================

Value models use every generated position of every rollout (the Q-sharp / CD-FUDGE
regression with all cut points at once); reward models (demo-reward scores whole
sequences for best-of-N, via ``models.runtime.sequence.SequenceScorer``) use every
(correct, incorrect) pair of rollouts of one problem. ``alignserve demo eval`` measures
what each per-step guide buys. Each guide directory holds the HF checkpoint, the head and the base's
tokenizer files; ``guides.json`` maps names to directories (``demo-reference`` to the base's own, a
plain causal-LM checkpoint served as an lm head, so that ``contrast`` can steer by
log pi_genarm - log pi_base) and ``guides_card.json`` describes the build.

    python -m models.demo.guides            # writes models/demo/checkpoints/{demo-*,guides.json,guides_card.json}
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerFast

from models.demo.build import demo_base_dir
from models.demo.paths import CHECKPOINTS_DIR, GUIDES_FILE
from models.demo.rollouts import sample_rollouts, training_problems
from models.training.guides import Backbone, GuideRecipe, save_guide, shared_features, train_guide
from models.training.loop import FitConfig
from models.training.rollouts import Rollouts, preference_pairs

CARD_NAME = "guides_card.json"
REFERENCE_GUIDE = "demo-reference"  # the base itself in the guide table: an lm guide (contrast's reference)
HISTOGRAM_ATOMS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass(frozen=True)
class GuideSpec:
    name: str
    head: dict[str, Any]  # head config for models.runtime.heads.build_head
    # regress prefixes onto R, or learn from (correct, incorrect) pairs
    objective: Literal["value", "preference"]
    beta: float = 1.0  # preference objectives: scale of the margin inside the sigmoid


GUIDES: tuple[GuideSpec, ...] = (
    GuideSpec("demo-value", {"type": "bernoulli", "scoring": "q"}, "value"),
    GuideSpec("demo-value-hist", {"type": "histogram", "scoring": "v", "atoms": HISTOGRAM_ATOMS}, "value"),
    GuideSpec("demo-prefix", {"type": "expected", "scoring": "v"}, "value"),
    GuideSpec("demo-arm", {"type": "arm", "scoring": "q", "rank": 8}, "preference"),
    GuideSpec("demo-genarm", {"type": "lm", "scoring": "q"}, "preference", beta=0.5),
    # Last: train_guide reseeds per guide, so appending leaves the guides above unchanged.
    # Bradley-Terry ranks the candidates of one prompt (pair accuracy 0.61 on validation); regressing R
    # (MSE) learnt mostly each problem's difficulty and ranked a prompt's candidates worse than chance.
    GuideSpec("demo-reward", {"type": "reward", "scoring": "v"}, "preference"),
)


@dataclass(frozen=True)
class GuideBuildConfig:
    """Sizes of the build (the defaults make the committed checkpoints)."""

    problems: int = 4000
    samples_per_problem: int = 4
    validation_fraction: float = 0.1  # of the problems, held back for the card's metrics
    # Top decoder layers fine-tuned with the head; the rest stay the base's. One layer generalised
    # better than two or four (less overfitting of the rollouts' problems).
    trainable_layers: int = 1
    # The committed checkpoints end at their last step (keep_best=False); the cards record the validation curve.
    value_fit: FitConfig = field(default_factory=lambda: FitConfig(steps=300, keep_best=False))
    # Pairs overfit quickly (a few thousand): fewer steps.
    preference_fit: FitConfig = field(default_factory=lambda: FitConfig(steps=100, keep_best=False))
    # One score per rollout learns slower than summed token scores: 300 steps (pair accuracy 0.58 at 100).
    sequence_reward_fit: FitConfig = field(default_factory=lambda: FitConfig(steps=300, keep_best=False))

    def recipe(self, spec: GuideSpec) -> GuideRecipe:
        fit = self.value_fit if spec.objective == "value" else self.preference_fit
        if spec.head["type"] == "reward":
            fit = self.sequence_reward_fit
        # The committed checkpoints serve raw token rewards: their strengths are the ones the docs quote.
        return GuideRecipe(spec.name, spec.head, spec.objective, spec.beta, fit, self.trainable_layers,
                           normalise_reward=False)


@contextmanager
def deterministic_torch() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def split_by_problem(rollouts: Rollouts, validation_fraction: float) -> tuple[Rollouts, Rollouts]:
    """(training, validation) rollouts; the first problems go to validation with all their samples."""
    num_problems = int(rollouts.problem.max()) + 1
    is_valid = rollouts.problem < round(num_problems * validation_fraction)
    return rollouts.subset(~is_valid), rollouts.subset(is_valid)


def build_guides(base_dir: Path, output_root: Path, seed: int = 0, progress: bool = True,
                 config: GuideBuildConfig = GuideBuildConfig()) -> dict[str, Any]:
    """Train every guide model in GUIDES on rollouts of the base in ``base_dir``, write each to
    ``output_root/<name>`` with ``guides.json`` and the build card (returned)."""
    base_dir, output_root = Path(base_dir), Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(base_dir))
    backbone = Backbone(base_dir)
    recipes = [config.recipe(spec) for spec in GUIDES]
    with deterministic_torch():
        problems = training_problems(config.problems, seed)
        rollouts = sample_rollouts(backbone.load(), tokenizer, problems, config.samples_per_problem, seed,
                                   progress=progress)
        rollout_seconds = time.perf_counter() - started
        train, valid = split_by_problem(rollouts, config.validation_fraction)
        data = {"train": train, "valid": valid}
        decoder, features = shared_features(backbone, recipes, data)
        guides = {}
        for recipe in recipes:
            depth = decoder.config.num_hidden_layers - recipe.trainable_layers
            model, guides[recipe.name] = train_guide(recipe, backbone, data, features[depth], seed, progress)
            save_guide(model, backbone, base_dir, output_root / recipe.name)
    table = {**{s.name: s.name for s in GUIDES}, REFERENCE_GUIDE: os.path.relpath(base_dir, output_root)}
    (output_root / GUIDES_FILE).write_text(json.dumps(table, indent=2) + "\n")
    card = {
        "seed": seed,
        "config": asdict(config),
        "rollouts": {
            "count": len(rollouts),
            "problems": config.problems,
            "samples_per_problem": config.samples_per_problem,
            "base_pass_at_1": round(rollouts.pass_at_1, 4),
            "preference_pairs": len(preference_pairs(train)),
            "seconds": round(rollout_seconds, 1),
        },
        "guides": guides,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "torch_version": torch.__version__,
    }
    (output_root / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the demo guide models from the demo base model.")
    parser.add_argument("--base-dir", type=Path, default=demo_base_dir())
    parser.add_argument("--output-root", type=Path, default=CHECKPOINTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    card = build_guides(args.base_dir, args.output_root, seed=args.seed)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
