"""A V-type value guide model as a Qwen2.5-Math-PRM checkpoint (``Qwen2ForProcessRewardModel``).

    python -m models.export_prm GUIDE_DIR OUT_DIR

The guide model (a Llama or Qwen2 backbone + a ``bernoulli`` head, scoring "v") reads
V(x) = sigmoid(w . h + b) at x's last token, h the final-norm hidden state. A Qwen2.5-Math-PRM
reads softmax(score(h_t))[1] at each step separator t, with score = Linear(d, d) -> ReLU ->
Linear(d, 2) (``models.runtime.hf_reward``). The export makes the two equal:

- Backbone: the same weights as a ``Qwen2Model``. Qwen2 attention has q/k/v biases; they are
  written as zeros (where the guide has none), so the backbone computes what the guide's does.
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

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, Qwen2Config

from models.runtime.heads import HEAD_CONFIG_FILE, HEAD_WEIGHTS_FILE
from models.runtime.hf_reward import QWEN_PRM_ARCHITECTURE
from models.runtime.loader import safetensors_files

CARD_FILE = "prm_card.json"
SEPARATOR = "<extra_0>"  # Qwen2.5-Math-PRM's step separator (guidance.search.hf_entries.QWEN_STEP_TAG)
BLANK_LINE = "\n\n"


def export_prm(guide_dir: Path, out_dir: Path) -> dict:
    """Write `guide_dir`'s value guide to `out_dir` as a ``Qwen2ForProcessRewardModel``; returns the card."""
    head = json.loads((guide_dir / HEAD_CONFIG_FILE).read_text())
    if head["type"] != "bernoulli" or head.get("scoring", "q") != "v":
        raise ValueError(f"{guide_dir}: a PRM export needs a 'bernoulli' head with scoring 'v' (its value is one "
                         f"softmax class); got {head['type']!r} with scoring {head.get('scoring', 'q')!r} "
                         "('histogram' V heads are not supported yet)")
    source = AutoConfig.from_pretrained(str(guide_dir), local_files_only=True)
    if source.model_type not in ("llama", "qwen2") or getattr(source, "mlp_bias", False) \
            or getattr(source, "attention_bias", False):
        raise ValueError(f"{guide_dir}: a PRM export needs a Llama backbone without biases (or a Qwen2 one)")

    tokenizer = AutoTokenizer.from_pretrained(str(guide_dir), local_files_only=True)
    blank = tokenizer(BLANK_LINE, add_special_tokens=False).input_ids
    tokenizer.add_tokens([SEPARATOR], special_tokens=True)
    separator_id = tokenizer.convert_tokens_to_ids(SEPARATOR)
    if separator_id > source.vocab_size:
        raise ValueError(f"{guide_dir}: its tokenizer has more tokens than the model's vocab_size={source.vocab_size}")

    weights = {name: tensor for file in safetensors_files(guide_dir) for name, tensor in load_file(file).items()
               if name.startswith("model.")}  # no lm_head: a PRM has none
    embed = weights["model.embed_tokens.weight"]
    if separator_id == len(embed):
        embed = torch.cat([embed, embed[:1]])
    embed[separator_id] = embed[blank[-1]]  # the separator reads as the blank-line token
    weights["model.embed_tokens.weight"] = embed
    for layer in range(source.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj"):
            prefix = f"model.layers.{layer}.self_attn.{proj}"
            weight = weights[f"{prefix}.weight"]
            weights.setdefault(f"{prefix}.bias", torch.zeros(len(weight), dtype=weight.dtype))

    head_weights = load_file(guide_dir / HEAD_WEIGHTS_FILE)
    w, b = head_weights["proj.weight"].reshape(-1).float(), head_weights["proj.bias"].reshape(-1).float()
    d = len(w)
    hidden = torch.zeros(d, d)
    hidden[0], hidden[1] = w, -w  # relu(w.h), relu(-w.h)
    out = torch.zeros(2, d)
    out[1, 0], out[1, 1] = 1.0, -1.0  # logit_1 = relu(w.h) - relu(-w.h) + b = w.h + b; logit_0 = 0
    weights.update({"score.0.weight": hidden, "score.0.bias": torch.zeros(d),
                    "score.2.weight": out, "score.2.bias": torch.cat([torch.zeros(1), b])})

    config = Qwen2Config(
        architectures=[QWEN_PRM_ARCHITECTURE], vocab_size=len(embed), hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size, num_hidden_layers=source.num_hidden_layers,
        num_attention_heads=source.num_attention_heads, num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads,
        hidden_act=source.hidden_act, max_position_embeddings=source.max_position_embeddings,
        rms_norm_eps=source.rms_norm_eps, rope_parameters=source.rope_parameters, use_sliding_window=False,
        tie_word_embeddings=False, bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id,
        pad_token_id=source.pad_token_id, dtype=source.dtype)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("guide_dir", type=Path, help="guide model with a 'bernoulli' head (scoring 'v')")
    parser.add_argument("out_dir", type=Path, help="where to write the Qwen2ForProcessRewardModel checkpoint")
    args = parser.parse_args()
    print(json.dumps(export_prm(args.guide_dir, args.out_dir), indent=2))


if __name__ == "__main__":
    main()
