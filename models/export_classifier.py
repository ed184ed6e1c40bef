"""A sequence reward guide model as a ``LlamaForSequenceClassification`` or
``Qwen2ForSequenceClassification`` checkpoint, which ``transformers`` and vLLM's pooling runner load
as they are (``alignserve models export-classifier``, ``alignserve train reward --classifier-out``).

The guide model (backbone + ``reward`` head, scoring "v") reads r(x) = w . h + b at x's last
token, h the final-norm hidden state. ``transformers``' sequence classifier reads ``score(h)`` at
the same token with a bias-free ``score`` layer (``num_labels=1``), which is what vLLM serves on
``/classify`` and ``/pooling`` (``--runner pooling``). The bias is a constant shift of every score,
so it is left out (written to the card): the exported model ranks candidates as the guide model
does, and its raw score (``use_activation: false``) is r(x) - b. The backbone is written in the
guide's own family, or as Qwen2 from a Llama one (``models.hf_export``).

transformers' classifier reads the rightmost token that is not ``pad_token_id``. Where the pad token
is also an end-of-sequence token (SmolLM2's ``<|im_end|>``), it would read the token *before* a
completion's final end-of-turn, not the one the guide (and vLLM's pooling runner) reads, so the
export writes no pad token then (said in the card): transformers reads the last token, and scores a
batch only with a pad token the caller sets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from models.hf_export import as_qwen2, backbone_weights, qwen2_config, read_backbone_config, read_head

CARD_FILE = "classifier_card.json"
ARCHITECTURES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}
ONE_LABEL = dict(num_labels=1, id2label={0: "reward"}, label2id={"reward": 0})


def export_classifier(guide_dir: Path, out_dir: Path, family: str | None = None) -> dict:
    """Write `guide_dir`'s reward model to `out_dir` as a one-label sequence classifier of `family`
    ("llama" or "qwen2"; default: the backbone's own); returns the card."""
    what = "a sequence-classifier export"
    _, head_weights = read_head(guide_dir, "reward", what)
    source = read_backbone_config(guide_dir, what)
    family = family or source.model_type
    if family not in ARCHITECTURES:
        raise ValueError(f"family must be one of {sorted(ARCHITECTURES)}, got {family!r}")
    if family == "llama" and source.model_type != "llama":
        raise ValueError(f"{guide_dir}: a {source.model_type} backbone has attention biases a Llama one has not; "
                         "export it as qwen2")
    weights = backbone_weights(guide_dir)
    weights["score.weight"] = head_weights["proj.weight"].reshape(1, -1).to(torch.float32)
    eos = source.eos_token_id if isinstance(source.eos_token_id, list) else [source.eos_token_id]
    pad = None if source.pad_token_id in eos else source.pad_token_id
    if family == "qwen2":
        config = qwen2_config(source, ARCHITECTURES[family], source.vocab_size, **ONE_LABEL)
        weights = as_qwen2(weights, source.num_hidden_layers)
    else:
        config = LlamaConfig.from_dict({**source.to_dict(), "architectures": [ARCHITECTURES[family]], **ONE_LABEL})
    config.pad_token_id = pad
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({name: t.contiguous() for name, t in weights.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    AutoTokenizer.from_pretrained(str(guide_dir), local_files_only=True).save_pretrained(str(out_dir))
    card = {"source": str(guide_dir), "architecture": ARCHITECTURES[family],
            "dropped_bias": float(head_weights["proj.bias"].reshape(-1)[0])}
    if pad != source.pad_token_id:
        card["pad_token_id"] = (f"none: the guide's pad token {source.pad_token_id} is an end-of-sequence token, "
                                "which transformers' classifier would skip at a completion's end")
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2))
    return card
