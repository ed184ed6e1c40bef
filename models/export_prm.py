"""A V-type value guide model as a Qwen2.5-Math-PRM checkpoint (``Qwen2ForProcessRewardModel``).

    alignserve models export-prm GUIDE_DIR OUT_DIR

The guide model (a Llama or Qwen2 backbone + a ``bernoulli`` head, scoring "v") reads
V(x) = sigmoid(w . h + b) at x's last token, h the final-norm hidden state. A Qwen2.5-Math-PRM
reads softmax(score(h_t))[1] at each step separator t, with score = Linear(d, d) -> ReLU ->
Linear(d, 2) (``models.runtime.hf_reward``). The export makes the two equal:

- Backbone: the same weights as a ``Qwen2Model`` (``models.hf_export.as_qwen2``: zero q/k/v biases
  where the guide has none), so the backbone computes what the guide's does.
- Head: score.0 has row 0 = w, row 1 = -w, the other rows and its bias 0; score.2 has class 1's
  row [1, -1, 0, ...] with bias b, class 0's row and bias 0. Then
  logit_1 - logit_0 = relu(w . h) - relu(-w . h) + b = w . h + b, so
  softmax(score(h))[1] = sigmoid(w . h + b): the guide's V at every position, exactly (up to
  float rounding).
- Separator: the base tokenizer has no ``<extra_0>``; it is added as a special token (the next id)
  and its embedding row is a copy of the row of the token the base tokenizer gives for a lone
  "\\n\\n" (its last token, said in the card, where "\\n\\n" is several). So the backbone sees each
  separator as a blank-line token: step k's score is the guide's V at "steps 1..k, each followed by
  a blank line" — equal to the guide's V of the generated prefix when the steps end with that token,
  close otherwise (not bit for bit where the generated text wrote the blank line as two "\\n" tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer

from models.hf_export import as_qwen2, backbone_weights, qwen2_config, read_backbone_config, read_head
from models.runtime.hf_reward import QWEN_PRM_ARCHITECTURE

CARD_FILE = "prm_card.json"
SEPARATOR = "<extra_0>"  # Qwen2.5-Math-PRM's step separator (guidance.search.hf_entries.QWEN_STEP_TAG)
BLANK_LINE = "\n\n"


def export_prm(guide_dir: Path, out_dir: Path) -> dict:
    """Write `guide_dir`'s value guide to `out_dir` as a ``Qwen2ForProcessRewardModel``; returns the card."""
    what = "a PRM export (its value is one softmax class; 'histogram' V heads are not supported yet)"
    _, head_weights = read_head(guide_dir, "bernoulli", what)
    source = read_backbone_config(guide_dir, what)

    tokenizer = AutoTokenizer.from_pretrained(str(guide_dir), local_files_only=True)
    blank = tokenizer(BLANK_LINE, add_special_tokens=False).input_ids
    tokenizer.add_tokens([SEPARATOR], special_tokens=True)
    separator_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    if separator_id > source.vocab_size:
        raise ValueError(f"{guide_dir}: its tokenizer has more tokens than the model's vocab_size={source.vocab_size}")

    weights = backbone_weights(guide_dir)
    embed = weights["model.embed_tokens.weight"]
    if separator_id == len(embed):
        embed = torch.cat([embed, embed[:1]])
    embed[separator_id] = embed[blank[-1]]  # the separator reads as the blank-line token
    weights["model.embed_tokens.weight"] = embed
    weights = as_qwen2(weights, source.num_hidden_layers)

    w, b = head_weights["proj.weight"].reshape(-1).float(), head_weights["proj.bias"].reshape(-1).float()
    d = len(w)
    hidden = torch.zeros(d, d)
    hidden[0], hidden[1] = w, -w  # relu(w.h), relu(-w.h)
    out = torch.zeros(2, d)
    out[1, 0], out[1, 1] = 1.0, -1.0  # logit_1 = relu(w.h) - relu(-w.h) + b = w.h + b; logit_0 = 0
    weights.update({"score.0.weight": hidden, "score.0.bias": torch.zeros(d),
                    "score.2.weight": out, "score.2.bias": torch.cat([torch.zeros(1), b])})

    config = qwen2_config(source, QWEN_PRM_ARCHITECTURE, len(embed))
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file({name: t.contiguous() for name, t in weights.items()}, out_dir / "model.safetensors",
              metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out_dir))
    card = {
        "source": str(guide_dir),
        "separator": {"token": SEPARATOR, "id": separator_id},
        "separator_embedding": {"copied_from": tokenizer.convert_ids_to_tokens(blank[-1]), "id": blank[-1],
                                "blank_line_tokens": len(blank)},
        "exact": ("softmax(logits)[1] = sigmoid(w . h + b), the guide's V, at every position; at a separator the "
                  "backbone reads the token copied, so step k's score is the guide's V of the steps so far, each "
                  "followed by that token: the guide's prefix score where the steps end with it, close but not "
                  "bit for bit where the text wrote the blank line otherwise (e.g. as two \"\\n\" tokens)"
                  + ("" if len(blank) == 1 else f"; \"\\n\\n\" is {len(blank)} tokens, only its last is copied")),
    }
    (out_dir / CARD_FILE).write_text(json.dumps(card, indent=2))
    return card

