"""A sequence reward guide model as a ``LlamaForSequenceClassification`` checkpoint, for vLLM's pooling runner.

    python -m models.export_classifier GUIDE_DIR OUT_DIR

The guide model (backbone + ``reward`` head, scoring "v") reads r(x) = w . h + b at x's last
token, h the final-norm hidden state. ``transformers``' sequence classifier reads ``score(h)`` at
the same token with a bias-free ``score`` layer (``num_labels=1``), which is what vLLM serves on
``/classify`` and ``/pooling`` (``--runner pooling``). The bias is a constant shift of every score,
so it is left out (written to the card): the served model ranks candidates as the guide model
does, and its raw score (``use_activation: false``) is r(x) - b.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.runtime.heads import HEAD_CONFIG_FILE

CARD_FILE = "classifier_card.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def export_classifier(guide_dir: Path, out_dir: Path) -> dict:
    """Write `guide_dir`'s reward model to `out_dir` as a sequence classifier; returns the card."""
    head = json.loads((guide_dir / HEAD_CONFIG_FILE).read_text())
    if head["type"] != "reward" or head.get("scoring", "q") != "v":
        raise ValueError(f"{guide_dir}: a sequence classifier needs a 'reward' head with scoring 'v', "
                         f"got {head['type']!r} with scoring {head.get('scoring', 'q')!r}")
    config = json.loads((guide_dir / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1,
                  id2label={"0": "reward"}, label2id={"reward": 0})
    weights = {name: tensor for name, tensor in load_file(guide_dir / "model.safetensors").items()
               if not name.startswith("lm_head.")}
    head_weights = load_file(guide_dir / "head.safetensors")
    weights["score.weight"] = head_weights["proj.weight"].to(torch.float32).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (guide_dir / name).is_file():
            shutil.copy(guide_dir / name, out_dir / name)
    card = {"source": str(guide_dir), "dropped_bias": float(head_weights["proj.bias"].reshape(-1)[0])}
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2))
    return card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("guide_dir", type=Path, help="guide model with a 'reward' head (scoring 'v')")
    parser.add_argument("out_dir", type=Path, help="where to write the LlamaForSequenceClassification checkpoint")
    args = parser.parse_args()
    print(json.dumps(export_classifier(args.guide_dir, args.out_dir), indent=2))


if __name__ == "__main__":
    main()
