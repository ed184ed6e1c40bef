"""The HF `generate` baseline (bench/hf_qsharp.py): its cached, incremental guide computation gives the
same logits as the qsharp offsets recomputed from the guide head on the whole sequence, on the demo
checkpoints (V-type histogram `demo-value-hist`, Q-type Bernoulli `demo-value`)."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import Tensor
from transformers import AutoTokenizer

from bench.hf_qsharp import HFGuide, QSharpLogitsProcessor, load_hf_guide, measure_hf
from guidance.modules.qsharp import QSharp
from models.demo.paths import CHECKPOINTS_DIR
from models.demo.task import sample_problems

BASE_DIR = CHECKPOINTS_DIR / "base"
PROMPTS = [p.prompt for p in sample_problems(3, seed=1)]  # of different lengths: left padding is exercised
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(BASE_DIR, padding_side="left")


@functools.cache
def guide_named(name: str) -> HFGuide:
    return load_hf_guide(CHECKPOINTS_DIR / name)


@torch.no_grad()
def recomputed_logits(guide: HFGuide, sequences: list[Tensor], scores: Tensor, strength: float,
                      top_k: int) -> Tensor:
    """scores + d, d from the guide run without a cache on each whole (unpadded) sequence: V-type on the
    k sequences s + y, Q-type on s."""
    vocab = scores.shape[-1]
    k = vocab if top_k == -1 else top_k
    expected = scores.clone()
    for row, sequence in enumerate(sequences):
        candidates = scores[row].topk(k).indices  # [k]
        if guide.head.scoring == "v":
            extended = torch.cat([sequence.expand(k, -1), candidates[:, None]], dim=1)  # [k, L + 1]
            candidate_scores = guide.head(guide.backbone(input_ids=extended).last_hidden_state[:, -1])
        else:
            candidate_scores = guide.head(guide.backbone(input_ids=sequence[None]).last_hidden_state[0, -1])[candidates]
        d = QSharp().offsets(candidate_scores[None], torch.tensor([[strength]]), guide.head.type, guide.atoms)[0]
        expected[row, candidates] += d
    return expected


# A V-type guide scores k appended candidates, so it needs a positive top_k; a Q-type one also takes -1.
@pytest.mark.parametrize(("name", "top_k"), [("demo-value-hist", 5), ("demo-value", 5), ("demo-value", -1)])
def test_incremental_guide_equals_full_recompute(name: str, tokenizer, top_k: int) -> None:
    guide = guide_named(name)
    inputs = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    guided = QSharpLogitsProcessor(guide, mask, strength=4.0, top_k=top_k)
    unguided = QSharpLogitsProcessor(guide, mask, strength=0.0, top_k=top_k)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # the prompt's prefill, then two one-token steps
        scores = torch.randn(len(PROMPTS), guide.backbone.config.vocab_size, generator=generator)
        scores[:, EOS] = -float("inf")  # as HF's min_new_tokens leaves it
        out = guided(input_ids, scores.clone())
        assert torch.equal(unguided(input_ids, scores.clone()), scores)
        sequences = [ids[m.bool()] for ids, m in zip(input_ids, mask)]
        torch.testing.assert_close(out, recomputed_logits(guide, sequences, scores, 4.0, top_k), atol=1e-5, rtol=1e-5)
        assert not torch.equal(out, scores)
        next_tokens = out.argmax(-1, keepdim=True)
        input_ids = torch.cat([input_ids, next_tokens], dim=1)
        mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=1)


@pytest.mark.parametrize("guide_name", [None, "demo-value-hist", "demo-value"])
def test_measure_hf_generates_exactly_max_tokens(guide_name: str | None) -> None:
    guide_dir = CHECKPOINTS_DIR / guide_name if guide_name else None
    result = measure_hf(BASE_DIR, guide_dir, PROMPTS, batch_size=2, max_tokens=6, strength=4.0, top_k=5,
                        temperature=1.0, seed=0, threads=None)
    assert (result.requests, result.output_tokens, len(result.latencies_s)) == (3, 3 * 6, 3)
    assert result.seconds > 0 and result.tokens_per_s == pytest.approx(result.output_tokens / result.seconds)
    assert (result.guide_seconds > 0) == (guide_name is not None)
