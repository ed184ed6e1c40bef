"""Shared by the GuidanceBatch tests: small guide models of every head type and a plain causal-LM
checkpoint (the `catalog` and `models` fixtures), references computed from the definitions by full
recompute, the guidance specs the tests use, and `FakeEngine`, which drives a batch as vLLM does and
checks every step."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from guidance.batch import GuidanceBatch
from guidance.catalog import GuideCatalog
from guidance.loading import load_guide_models
from guidance.spec import parse_guidance
from models.runtime import build_head, save_head

V, H = 64, 128
HEADS = {
    "value": {"type": "bernoulli", "scoring": "q"},
    "hist": {"type": "histogram", "scoring": "v", "atoms": [0.0, 0.5, 1.0]},
    "prefix": {"type": "expected", "scoring": "v"},
    "arm": {"type": "arm", "scoring": "q", "rank": 4},
    "rlm": {"type": "lm", "scoring": "q"},
}
PLAIN_LM = "plain"  # a causal-LM checkpoint without a guide head: served as an lm head


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> GuideCatalog:
    root = tmp_path_factory.mktemp("guides")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64, initializer_range=0.2)
    paths = {}
    for i, (name, head) in enumerate(HEADS.items()):
        path = root / name
        torch.manual_seed(i)
        LlamaForCausalLM(config).save_pretrained(path)
        built = build_head(head, H, V)
        with torch.no_grad():
            for p in built.parameters():
                p.normal_(0, 0.3)
        save_head(built, path)
        paths[name] = path
    torch.manual_seed(len(HEADS))
    LlamaForCausalLM(config).save_pretrained(root / PLAIN_LM)
    paths[PLAIN_LM] = root / PLAIN_LM
    return GuideCatalog.from_paths(paths)


def full_recompute_log_probs(model, tokens: list[int]) -> torch.Tensor:
    """log pi(y | tokens) of an lm-head guide model over the vocabulary ``[V]``, in float64, by a forward
    over the whole prefix."""
    with torch.no_grad():
        hidden = model.backbone.forward(torch.tensor([tokens]))[:, -1]
        return torch.log_softmax(model.head(hidden, model.backbone.output_embedding)[0].double(), -1)


@pytest.fixture
def models(catalog):
    return load_guide_models(catalog, dtype=torch.float32, device="cpu")


def reference_kl(logits: torch.Tensor, offsets: torch.Tensor, temperature: float = 1.0) -> float:
    """KL(softmax((l + d) / T) || softmax(l / T)) of one row ``[V]``, from the definition; greedy
    (T = 0) is reported at T = 1."""
    t = temperature if temperature >= 1e-5 else 1.0
    log_p = torch.log_softmax(logits.double() / t, -1)
    log_q = torch.log_softmax((logits + offsets).double() / t, -1)
    return float((log_q.exp() * (log_q - log_p)).sum())


def reference_entropy(logits: torch.Tensor, temperature: float = 1.0) -> float:
    """H(softmax(l / T)) of one row from the definition; greedy (T = 0) at T = 1."""
    p = torch.softmax(logits.double() / (temperature if temperature >= 1e-5 else 1.0), -1)
    return float(-(p * p.log()).sum())


def reference_offsets(models, catalog, guidance, tokens: list[int], logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Offsets for one row by full recompute of the guide models over `tokens`; an entry whose
    `min_entropy` is above the base entropy at `temperature` adds nothing."""
    total = torch.zeros(V)
    for entry in guidance:
        if entry.params.strength == 0 or reference_entropy(logits, temperature) < entry.params.min_entropy:
            continue
        k = V if entry.top_k == -1 else entry.top_k
        candidates = torch.topk(logits, k).indices
        if entry.module.name == "contrast":  # s * (log pi_expert - log pi_reference), from the definition
            ratio = (full_recompute_log_probs(models[entry.params.model], tokens)
                     - full_recompute_log_probs(models[entry.params.reference], tokens))
            total[candidates] += (entry.params.strength * ratio[candidates]).float()
            continue
        model, info = models[entry.params.model], catalog[entry.params.model]
        atoms = torch.tensor(info.atoms) if info.atoms else None
        strength = torch.tensor([[entry.params.strength]])
        with torch.no_grad():
            if info.scoring == "q":
                hidden = model.backbone.forward(torch.tensor([tokens]))[:, -1]
                scores = entry.module.token_scores(model.head(hidden, model.backbone.output_embedding))[0]
                candidate_scores = scores[candidates].unsqueeze(0)
            else:
                rows = torch.tensor([tokens + [c] for c in candidates.tolist()])
                candidate_scores = model.head(model.backbone.forward(rows)[:, -1:], None)[:, 0].unsqueeze(0)
        d = entry.module.offsets(candidate_scores, strength, info.head_type, atoms)[0]
        total[candidates] += d
    return total


SPECS = {
    "q": [{"type": "qsharp", "model": "value", "strength": 3.0, "top_k": 5}],
    "hist+cd": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4},
                {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6}],
    "arm+genarm": [{"type": "arm", "model": "arm", "strength": 0.7},
                   {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": 10}],
    "arm": [{"type": "arm", "model": "arm", "strength": 0.7}],
    "gated+arm whole": [{"type": "qsharp", "model": "value", "strength": 2.0, "top_k": -1, "min_entropy": 3.0},
                        {"type": "arm", "model": "arm", "strength": 0.7, "min_entropy": 2.0}],
    "zero": [{"type": "qsharp", "model": "value", "strength": 0.0}],
    "gated": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4, "min_entropy": 3.0}],
    "gated+arm": [{"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6, "min_entropy": 3.5},
                  {"type": "arm", "model": "arm", "strength": 0.7, "min_entropy": 2.0}],
    "hist+cd@0": [{"type": "qsharp", "model": "hist", "strength": 2.0, "top_k": 4, "min_entropy": 0},
                  {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 6, "min_entropy": 0.0}],
    # top-3, top-5 (one group, twice on a row), top-4 and top-2 of one row: offsets on the same tokens
    "same tokens": [{"type": "qsharp", "model": "value", "strength": 3.0, "top_k": 3},
                    {"type": "qsharp", "model": "value", "strength": 1.0, "top_k": 5},
                    {"type": "cd", "model": "prefix", "strength": 1.5, "top_k": 4},
                    {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": 2}],
    "q whole": [{"type": "qsharp", "model": "value", "strength": 2.0, "top_k": -1}],
    "contrast": [{"type": "contrast", "model": "rlm", "reference": PLAIN_LM, "strength": 1.5}],
    # top-6 of the contrast and top-10 of a genarm entry on the same lm model: four groups, sparse offsets
    "contrast top_k+genarm": [{"type": "contrast", "model": PLAIN_LM, "reference": "rlm", "strength": 0.8,
                               "top_k": 6},
                              {"type": "genarm", "model": "rlm", "strength": 0.5, "top_k": 10}],
    "contrast gated": [{"type": "contrast", "model": "rlm", "reference": PLAIN_LM, "strength": 2.0,
                        "min_entropy": 3.0}],
}


class FakeEngine:
    """Drives a batch like vLLM does: rows, live output lists, greedy sampling on guided logits."""

    def __init__(self, batch: GuidanceBatch, catalog, models, seed: int = 0, spread: bool = False) -> None:
        self.batch, self.catalog, self.models = batch, catalog, models
        self.rows: dict[int, dict] = {}
        self.generator = torch.Generator().manual_seed(seed)
        self.spread = spread  # rows from peaked to flat: base entropies spread over (0, log V)
        self.expected_kl: dict[str, float] = {}
        self.expected_steps: dict[str, int] = {}

    def add(self, row: int, key: str, spec: str, prompt: list[int], temperature: float = 1.0) -> None:
        guidance = parse_guidance(SPECS[spec], self.catalog)
        request = {"key": key, "guidance": guidance, "prompt": prompt, "output": [], "temperature": temperature}
        self.rows[row] = request
        self.expected_kl[key] = 0.0
        self.expected_steps[key] = 0
        self.batch.add(row, key, guidance, prompt, request["output"], temperature=temperature)

    def remove(self, row: int) -> None:
        del self.rows[row]
        self.batch.remove(row)

    def move(self, source: int, target: int, swap: bool) -> None:
        a, b = self.rows.pop(source, None), self.rows.pop(target, None)
        if a is not None:
            self.rows[target] = a
        if swap and b is not None:
            self.rows[source] = b
        self.batch.move(source, target, swap)

    def step(self) -> None:
        size = max(self.rows) + 1
        logits = torch.randn(size, V, generator=self.generator)
        if self.spread:
            logits *= torch.rand(size, 1, generator=self.generator) * 6
        expected = logits.clone()
        for row, request in self.rows.items():
            d = reference_offsets(self.models, self.catalog, request["guidance"],
                                  request["prompt"] + request["output"], logits[row], request["temperature"])
            expected[row] = logits[row] + d
            self.expected_kl[request["key"]] += reference_kl(logits[row], d, request["temperature"])
            self.expected_steps[request["key"]] += any(
                e.params.strength > 0 and reference_entropy(logits[row], request["temperature"]) >= e.params.min_entropy
                for e in request["guidance"])
        out = self.batch.apply(logits.clone())
        assert torch.allclose(out, expected, atol=1e-4), (out - expected).abs().max()
        for row, request in self.rows.items():
            request["output"].append(int(out[row].argmax()))
