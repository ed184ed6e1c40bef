"""Training one guide model from rollouts, and writing the directory the server loads as it is.

A guide's backbone is initialised from a checkpoint (the base itself, or a smaller
sibling with the same tokenizer), optionally cut to its first ``layers`` decoder layers;
its top ``trainable_layers`` layers, final norm and head are trained, the rest stay frozen
(their output on the rollouts is computed once). Objectives (``models.training.objectives``):

============ ================================================================================
objective    loss
============ ================================================================================
value        per target token: BCE onto R (bernoulli), CE onto R's atom (histogram), MSE (expected)
preference   Bradley-Terry on (correct, incorrect) rollouts of one prompt: -log sigmoid(beta (S_w - S_l))
likelihood   lm head: mean -log pi(x_t | x_<t) over the completion tokens (of the right rollouts)
============ ================================================================================

A likelihood-trained lm head is the expert of a ``contrast`` entry; ``save_untuned`` writes its
reference, the same backbone before tuning.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from models.runtime.decoder import Decoder
from models.runtime.heads import CAUSAL_LM_HEAD, TOKEN_REWARD_HEADS, build_head, save_head
from models.runtime.loader import load_decoder
from models.training.curves import CURVES_FILE, plot_curves
from models.training.loop import FitConfig
from models.training.objectives import (
    GuideTrainee,
    calibration_error,
    fit_likelihood,
    fit_preference,
    fit_value,
    frozen_features,
    likelihood_metrics,
    preference_metrics,
    reward_spread,
    value_metrics,
)
from models.training.rollouts import Rollouts, preference_pairs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt")
TRAIN_STATE_FILE = "train_state.pt"  # in the work directory of a resumable run
CARD_FILE = "guide_card.json"


@dataclass(frozen=True)
class GuideRecipe:
    """What to train: a head on a backbone, with one objective."""

    name: str
    head: dict[str, Any]  # head config for models.runtime.heads.build_head
    objective: Literal["value", "preference", "likelihood"]
    beta: float = 1.0  # preference: scale of the margin inside the sigmoid
    fit: FitConfig = field(default_factory=lambda: FitConfig(steps=300))
    trainable_layers: int = 1
    # Token-reward heads (arm, lm) trained on preferences: serve rewards scaled to unit spread of the sequence
    # reward on validation. (A likelihood-trained lm head is a policy: its log-probabilities are served as they are.)
    normalise_reward: bool = True


def default_guide_layers(init_from: Path) -> int:
    """The layers a guide keeps when the user does not say: half of ``init_from``'s decoder layers, rounded up.

    Measured on SmolLM2-135M-Instruct chat-arith (docs/results/smollm2-guide-size): the smallest cut whose
    Q-sharp value model lifted held-out pass@1 by 10 points at KL budgets of 0.5 and 1 nat; the full copy
    lifted it more at 1 nat and guided at about half the speed, 4- and 8-layer cuts ran faster and lifted less."""
    layers = json.loads((init_from / "config.json").read_text())["num_hidden_layers"]
    return (layers + 1) // 2


@dataclass(frozen=True)
class Backbone:
    """Where a guide's backbone comes from: ``init_from`` cut to its first ``layers`` layers (None: all)."""

    init_from: Path
    layers: int | None = None

    def load(self) -> Decoder:
        decoder = load_decoder(self.init_from)
        if self.layers is not None:
            total = decoder.config.num_hidden_layers
            if not 1 <= self.layers <= total:
                raise ValueError(f"layers must be in [1, {total}] for {self.init_from}, got {self.layers}")
            decoder.layers = decoder.layers[: self.layers]
            decoder.config = dataclasses.replace(decoder.config, num_hidden_layers=self.layers)
        return decoder


def shared_features(backbone: Backbone, recipes: list[GuideRecipe], data: dict[str, Rollouts]
                    ) -> tuple[Decoder, dict[int, dict[str, torch.Tensor]]]:
    """The backbone, and the output of its frozen layers on each part of ``data``, computed once per
    distinct frozen depth among ``recipes`` (guides with the same depth share it)."""
    decoder = backbone.load()
    depths = {decoder.config.num_hidden_layers - r.trainable_layers for r in recipes}
    return decoder, {depth: {part: frozen_features(decoder, r.input_ids, depth) for part, r in data.items()}
                     for depth in depths}


def train_guide(recipe: GuideRecipe, backbone: Backbone, data: dict[str, Rollouts],
                features: dict[str, torch.Tensor], seed: int, progress: bool,
                checkpoint: Path | None = None) -> tuple[GuideTrainee, dict[str, Any]]:
    """Fit ``recipe`` on ``data`` ({"train", "valid"} rollouts, with the frozen layers' ``features``);
    returns the model and its card entry (sizes, losses, validation metrics, seconds)."""
    decoder = backbone.load()
    torch.manual_seed(seed)
    head = build_head(recipe.head, decoder.config.hidden_size, decoder.config.vocab_size)
    model = GuideTrainee(decoder, head, recipe.trainable_layers)
    train, valid = data["train"], data["valid"]
    started = time.perf_counter()
    fit = recipe.fit
    untuned = {}
    if recipe.objective == "likelihood":
        # Before the fit the trainee is the untuned backbone: the reference's validation loss.
        untuned = {"untuned_validation": {k: round(v, 4) for k, v in
                                         asdict(likelihood_metrics(model, valid, features["valid"])).items()}}
        result = fit_likelihood(model, train, features["train"], fit, seed, recipe.name, progress, checkpoint,
                                validation=(valid, features["valid"]))
        metrics = asdict(likelihood_metrics(model, valid, features["valid"]))
        examples = int(train.completion_mask.sum())
    elif recipe.objective == "value":
        result = fit_value(model, train, features["train"], fit, seed, recipe.name, progress, checkpoint,
                           validation=(valid, features["valid"]))
        metrics = asdict(value_metrics(model, valid, features["valid"]))
        if head.type == "bernoulli":
            metrics["calibration_error"] = calibration_error(model, valid, features["valid"])
        examples = int(train.target_mask.sum())
    else:
        train_pairs, valid_pairs = preference_pairs(train), preference_pairs(valid)
        if len(train_pairs) == 0 or len(valid_pairs) == 0:
            raise ValueError(f"{recipe.name}: no (correct, incorrect) rollout pairs to train or validate on")
        result = fit_preference(model, train, features["train"], train_pairs, recipe.beta, fit, seed,
                                recipe.name, progress, checkpoint, validation=(valid, features["valid"], valid_pairs))
        metrics = asdict(preference_metrics(model, valid, features["valid"], valid_pairs, recipe.beta))
        examples = len(train_pairs)
    spread = None
    if recipe.normalise_reward and recipe.objective == "preference" and head.type in TOKEN_REWARD_HEADS:
        spread = reward_spread(model, valid, features["valid"])
        head.reward_scale = spread.scale
    card = {
        **head.config(),
        "objective": recipe.objective,
        **({"beta": recipe.beta} if recipe.objective == "preference" else {}),
        "backbone": {"init_from": str(backbone.init_from), "layers": decoder.config.num_hidden_layers,
                     "trainable_layers": recipe.trainable_layers},
        "training_examples": examples,
        "fit": asdict(fit),
        "train_loss": round(result.train_loss, 4),
        "validation": {name: round(value, 4) for name, value in metrics.items()},
        **untuned,
        "steps_run": result.steps_run,
        "best_step": result.best_step,
        "kept": "best validation" if fit.keep_best else "last step",
        "stopped_early": result.stopped_early,
        "curve": result.curve,
        **({"reward_scale": {"scale": round(spread.scale, 6), "validation_mean": round(spread.mean, 4),
                             "validation_std": round(spread.std, 4), "sequences": spread.sequences}}
           if spread is not None else {}),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return model, card


def save_guide(model: GuideTrainee, backbone: Backbone, tokenizer_dir: Path, output_dir: Path,
               card: dict[str, Any] | None = None) -> None:
    """Write an HF checkpoint of the backbone (``config.json`` with its layer count, and
    ``model.safetensors``), the head, the tokenizer files of ``tokenizer_dir`` and the card,
    replacing ``output_dir`` whole (written beside it, then renamed)."""
    output_dir = Path(output_dir)
    partial = output_dir.with_name(output_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    config = json.loads((backbone.init_from / "config.json").read_text())
    config["num_hidden_layers"] = model.decoder.config.num_hidden_layers
    if isinstance(config.get("layer_types"), list):
        config["layer_types"] = config["layer_types"][: config["num_hidden_layers"]]
    config["torch_dtype"] = config["dtype"] = "float32"
    (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tied = model.decoder.config.tie_word_embeddings
    state = {f"model.{name}": tensor.detach().contiguous() for name, tensor in model.decoder.state_dict().items()
             if not name.startswith("lm_head.")}
    if model.decoder.lm_head is not None and not tied:
        state["lm_head.weight"] = model.decoder.lm_head.weight.detach().contiguous()
    save_file(state, str(partial / "model.safetensors"), metadata={"format": "pt"})
    save_head(model.head, partial)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, partial / name)
    if card is not None:
        (partial / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        if card.get("curve"):
            plot_curves(card["curve"], card.get("name", output_dir.name), partial / CURVES_FILE, card.get("best_step"))
    if output_dir.exists():
        shutil.rmtree(output_dir)
    partial.replace(output_dir)


def save_untuned(backbone: Backbone, tokenizer_dir: Path, output_dir: Path, card: dict[str, Any]) -> None:
    """Write ``backbone`` as it is (cut to its layers, nothing trained) as an lm guide: the reference of a
    likelihood-trained expert on the same backbone."""
    decoder = backbone.load()
    head = build_head(CAUSAL_LM_HEAD, decoder.config.hidden_size, decoder.config.vocab_size)
    save_guide(GuideTrainee(decoder, head, trainable_layers=0), backbone, tokenizer_dir, output_dir, card)
