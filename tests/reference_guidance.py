"""An independent reference for guided greedy decoding: a plain transformers loop.

No KV cache, no batching, no vLLM, no `models.runtime` decoder: every step re-runs
the base model and the guide backbone (transformers' LlamaModel) over the whole
prefix and applies the rule of DESIGN.md section 3 written out directly. `guided_kl`
recomputes the reported KL of a given completion the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM


class ReferenceGuide:
    def __init__(self, path: Path) -> None:
        self.lm = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
        self.head = json.loads((path / "guide_head.json").read_text())
        self.weights = load_file(str(path / "head.safetensors"))

    def hidden(self, ids: list[int]) -> torch.Tensor:
        """Final-norm hidden state of the last token, [H]."""
        out = self.lm.model(torch.tensor([ids]))
        return out.last_hidden_state[0, -1]

    def raw_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The head's output for hidden h: [V] / [V, m] (Q-type) or [] / [m] (V-type)."""
        kind, scoring = self.head["type"], self.head["scoring"]
        if kind == "lm":
            return self.lm.lm_head(h)
        if kind == "arm":
            e = self.lm.lm_head.weight  # tied output embeddings [V, H]
            u, v, b = self.weights["u"], self.weights["v"], self.weights["b"]
            return e @ (u @ (v.T @ h)) + b @ h
        out = self.weights["proj.weight"] @ h + self.weights["proj.bias"]
        atoms = len(self.head.get("atoms", [0]))
        if scoring == "q":
            return out.reshape(-1, atoms).squeeze(-1)
        return out.reshape(atoms).squeeze(-1)


def value_offset(kind: str, rule: str, score: torch.Tensor, strength: float, atoms: list[float] | None) -> float:
    """The offset for one token from its score, written out per DESIGN.md section 3."""
    if rule == "qsharp":
        if kind == "bernoulli":
            p = 1.0 / (1.0 + math.exp(-float(score)))
            return math.log(1.0 - p + p * math.exp(strength))
        probs = torch.softmax(score.double(), -1).tolist()
        return math.log(sum(pj * math.exp(strength * z) for pj, z in zip(probs, atoms)))
    # cd: strength times the expected value.
    if kind == "bernoulli":
        return strength / (1.0 + math.exp(-float(score)))
    if kind == "histogram":
        return strength * sum(pj * z for pj, z in zip(torch.softmax(score.double(), -1).tolist(), atoms))
    return strength * float(score)


def entropy_at_temperature(logits: torch.Tensor, temperature: float) -> float:
    """H(softmax(l / T)) = -sum_y p(y) log p(y) in nats; greedy (T = 0) at T = 1."""
    p = torch.softmax(logits.double() / (temperature if temperature >= 1e-5 else 1.0), -1)
    return float(-(p[p > 0] * p[p > 0].log()).sum().detach())


def guided_offsets(logits: torch.Tensor, guides: dict[str, ReferenceGuide], guidance: list[dict],
                   ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """The summed offsets d(s, y) of all entries for prefix `ids` with base logits `logits` [V] (float64);
    an entry with `min_entropy` above the base entropy at `temperature` adds nothing."""
    offsets = torch.zeros_like(logits)
    for entry in guidance:
        guide, rule, strength = guides[entry["model"]], entry["type"], entry["strength"]
        if strength == 0 or entropy_at_temperature(logits, temperature) < entry.get("min_entropy", 0.0):
            continue
        kind, scoring, atoms = guide.head["type"], guide.head["scoring"], guide.head.get("atoms")
        default_k = 20 if rule in ("qsharp", "cd") else -1
        k = entry.get("top_k", default_k)
        candidates = torch.topk(logits, logits.numel() if k == -1 else k).indices.tolist()
        if rule in ("arm", "genarm"):
            scores = guide.raw_scores(guide.hidden(ids)).double()
            if rule == "genarm":
                scores = torch.log_softmax(scores, -1)
            for c in candidates:
                offsets[c] += strength * scores[c]
            continue
        q_scores = guide.raw_scores(guide.hidden(ids)) if scoring == "q" else None
        for c in candidates:
            score = q_scores[c] if scoring == "q" else guide.raw_scores(guide.hidden(ids + [c]))
            offsets[c] += value_offset(kind, rule, score, strength, atoms)
    return offsets


def kl_at_temperature(logits: torch.Tensor, offsets: torch.Tensor, temperature: float) -> float:
    """KL(pi_guided || pi_base) between the distributions sampled at `temperature`: the offsets
    are added before temperature, so pi_guided = softmax((l + d) / T), pi_base = softmax(l / T)
    (top-p / top-k truncation comes later and is left out). Greedy (T = 0) is taken at T = 1."""
    t = temperature if temperature >= 1e-5 else 1.0
    log_base = torch.log_softmax(logits.double() / t, -1)
    log_guided = torch.log_softmax((logits + offsets).double() / t, -1)
    guided = log_guided.exp()
    keep = guided > 0
    return float((guided[keep] * (log_guided[keep] - log_base[keep])).sum())


@torch.no_grad()
def guided_greedy(base: LlamaForCausalLM, guides: dict[str, ReferenceGuide], guidance: list[dict],
                  prompt_ids: list[int], max_tokens: int, eos_id: int) -> list[int]:
    ids, out = list(prompt_ids), []
    for _ in range(max_tokens):
        logits = base(torch.tensor([ids])).logits[0, -1].double()
        offsets = guided_offsets(logits, guides, guidance, ids)
        token = int(torch.argmax(logits + offsets))
        out.append(token)
        if token == eos_id:
            break
        ids.append(token)
    return out


@torch.no_grad()
def guided_kl(base: LlamaForCausalLM, guides: dict[str, ReferenceGuide], guidance: list[dict],
              prompt_ids: list[int], output_ids: list[int], temperature: float) -> tuple[float, float]:
    """The Q-sharp paper's response KL of a given completion, teacher-forced: the sum over its
    tokens of the per-step KL at `temperature`. Returns (KL at `temperature`, KL at T = 1)."""
    ids, at_t, at_one = list(prompt_ids), 0.0, 0.0
    for token in output_ids:
        logits = base(torch.tensor([ids])).logits[0, -1].double()
        offsets = guided_offsets(logits, guides, guidance, ids, temperature)
        at_t += kl_at_temperature(logits, offsets, temperature)
        at_one += kl_at_temperature(logits, offsets, 1.0)
        ids.append(token)
    return at_t, at_one


@torch.no_grad()
def steered_steps(base: LlamaForCausalLM, guidance: list[dict], prompt_ids: list[int], output_ids: list[int],
                  temperature: float) -> int:
    """The positions of a completion where some entry steered: strength > 0 and the base entropy at
    `temperature` at least the entry's `min_entropy` (every position of ungated guidance)."""
    ids, steps = list(prompt_ids), 0
    for token in output_ids:
        entropy = entropy_at_temperature(base(torch.tensor([ids])).logits[0, -1], temperature)
        steps += any(e["strength"] > 0 and entropy >= e.get("min_entropy", 0.0) for e in guidance)
        ids.append(token)
    return steps
