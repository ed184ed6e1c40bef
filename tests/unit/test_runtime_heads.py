"""Guide heads: exact formulas on hand-made tensors, shapes, save/load, and the GuideModel wiring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.runtime import (
    HEAD_TYPES,
    ARMHead,
    CheckpointError,
    GuideModel,
    HistogramHead,
    build_head,
    load_decoder,
    load_guide_model,
    load_head,
    save_head,
)

H, V = 128, 100
CONFIGS = {
    ("bernoulli", "q"): {"type": "bernoulli", "scoring": "q"},
    ("bernoulli", "v"): {"type": "bernoulli", "scoring": "v"},
    ("expected", "q"): {"type": "expected", "scoring": "q"},
    ("expected", "v"): {"type": "expected", "scoring": "v"},
    ("reward", "v"): {"type": "reward", "scoring": "v"},
    ("histogram", "q"): {"type": "histogram", "scoring": "q", "atoms": [0.0, 0.25, 0.5, 1.0]},
    ("histogram", "v"): {"type": "histogram", "scoring": "v", "atoms": [-1.0, 0.0, 1.0]},
    ("arm", "q"): {"type": "arm", "scoring": "q", "rank": 4},
    ("lm", "q"): {"type": "lm", "scoring": "q"},
}
# Expected output shape for hidden [B=2, H] (Q-type) or [B=2, k=3, H] (V-type).
SHAPES = {
    ("bernoulli", "q"): (2, V),
    ("bernoulli", "v"): (2, 3),
    ("expected", "q"): (2, V),
    ("expected", "v"): (2, 3),
    ("reward", "v"): (2, 3),
    ("histogram", "q"): (2, V, 4),
    ("histogram", "v"): (2, 3, 3),
    ("arm", "q"): (2, V),
    ("lm", "q"): (2, V),
}


def hidden_for(scoring: str) -> torch.Tensor:
    return torch.randn(2, H) if scoring == "q" else torch.randn(2, 3, H)


def test_every_head_type_is_covered() -> None:
    assert {t for t, _ in CONFIGS} == set(HEAD_TYPES)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_shapes(key: tuple[str, str]) -> None:
    head = build_head(CONFIGS[key], H, V)
    assert head.scoring == key[1] and head.config() == CONFIGS[key]
    assert head(hidden_for(key[1]), torch.randn(V, H)).shape == SHAPES[key]


@pytest.mark.parametrize("key", list(CONFIGS))
def test_save_load_roundtrip(key: tuple[str, str], tmp_path: Path) -> None:
    head = build_head(CONFIGS[key], H, V)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()  # not the initial values, so that a load that drops weights fails
    save_head(head, tmp_path)
    assert json.loads((tmp_path / "guide_head.json").read_text()) == CONFIGS[key]
    loaded = load_head(tmp_path, H, V)
    hidden, emb = hidden_for(key[1]), torch.randn(V, H)
    assert torch.equal(loaded(hidden, emb), head(hidden, emb))


def test_arm_formula_on_hand_made_tensors() -> None:
    """r(s, y) = e_y . (U V^T h) + b . h, computed element by element."""
    head = ARMHead(hidden_size=3, vocab_size=2, scoring="q", rank=1)
    with torch.no_grad():
        head.u.copy_(torch.tensor([[1.0], [0.0], [2.0]]))
        head.v.copy_(torch.tensor([[0.5], [1.0], [0.0]]))
        head.b.copy_(torch.tensor([1.0, -1.0, 0.5]))
    h = torch.tensor([[2.0, 1.0, 4.0]])
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 1.0]])
    # V^T h = 0.5*2 + 1*1 = 2 -> W h = U * 2 = [2, 0, 4]; b . h = 2 - 1 + 2 = 3
    # y=0: e_0 . [2, 0, 4] + 3 = 5 ; y=1: 0 + 0 + 4 + 3 = 7
    assert torch.equal(head(h, emb), torch.tensor([[5.0, 7.0]]))
    u, v, b = head.u.detach(), head.v.detach(), head.b.detach()
    w = [[float(u[i] @ v[j]) for j in range(3)] for i in range(3)]  # W = U V^T
    explicit = [
        sum(emb[y, i] * sum(w[i][j] * h[0, j] for j in range(3)) for i in range(3)) + sum(b * h[0]) for y in range(2)
    ]
    torch.testing.assert_close(head(h, emb).detach(), torch.tensor([explicit]))


def test_value_heads_on_hand_made_tensors() -> None:
    q = build_head({"type": "histogram", "scoring": "q", "atoms": [0.0, 1.0]}, hidden_size=2, vocab_size=3)
    with torch.no_grad():
        q.proj.weight.copy_(torch.arange(12.0).reshape(6, 2))  # row (y, j) = 2 * (y*m + j) + [0, 1]
        q.proj.bias.zero_()
    out = q(torch.tensor([[1.0, 1.0]]), None)
    # atom logit of (y, j) = w[y*m+j] . [1, 1] = 4 * (y*m + j) + 1
    assert torch.equal(out, torch.tensor([[[1.0, 5.0], [9.0, 13.0], [17.0, 21.0]]]))
    v = build_head({"type": "bernoulli", "scoring": "v"}, hidden_size=2, vocab_size=3)
    with torch.no_grad():
        v.proj.weight.copy_(torch.tensor([[1.0, -2.0]]))
        v.proj.bias.fill_(0.5)
    assert torch.equal(v(torch.tensor([[[1.0, 1.0], [3.0, 0.0]]]), None), torch.tensor([[-0.5, 3.5]]))


def test_histogram_atoms() -> None:
    head = HistogramHead(H, V, "v", atoms=[0, 0.5, 1])
    assert head.atoms.tolist() == [0.0, 0.5, 1.0] and head.config()["atoms"] == [0.0, 0.5, 1.0]
    half = head.to(torch.bfloat16)
    assert half.atoms.dtype == torch.bfloat16 and half.config()["atoms"] == [0.0, 0.5, 1.0]
    for bad in ([1.0], [0.0, 0.0], [1.0, 0.0], [0.0, float("nan")]):
        with pytest.raises(ValueError, match="strictly increasing"):
            HistogramHead(H, V, "q", atoms=bad)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"type": "mlp"}, "unknown guide head type 'mlp'"),
        ({"type": "bernoulli", "atoms": [0, 1]}, r"unknown parameters \['atoms'\]"),
        ({"type": "histogram"}, r"needs parameters \['atoms'\]"),
        ({"type": "arm", "scoring": "v", "rank": 2}, "does not support scoring='v'"),
        ({"type": "lm", "scoring": "v"}, "does not support scoring='v'"),
        ({"type": "reward", "scoring": "q"}, "does not support scoring='q'"),
        ({"type": "expected", "scoring": "x"}, "scoring='x'"),
        ({"type": "arm", "rank": 0}, "rank must be a positive integer"),
    ],
)
def test_build_head_errors(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_head(config, H, V)


def test_load_head_rejects_weights_that_do_not_match_config(tmp_path: Path) -> None:
    save_head(build_head(CONFIGS[("histogram", "q")], H, V), tmp_path)
    (tmp_path / "guide_head.json").write_text(json.dumps({"type": "histogram", "scoring": "q", "atoms": [0, 1]}))
    with pytest.raises(CheckpointError, match="'histogram' head needs"):
        load_head(tmp_path, H, V)
    (tmp_path / "guide_head.json").unlink()
    with pytest.raises(FileNotFoundError, match="guide_head.json"):
        load_head(tmp_path, H, V)


# ---------------------------------------------------------------- GuideModel


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guide")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, initializer_range=0.1)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def guide_dir(backbone_dir: Path, tmp_path: Path, key: tuple[str, str]) -> Path:
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(backbone_dir / name)
    torch.manual_seed(1)
    save_head(build_head(CONFIGS[key], H, V), tmp_path)
    return tmp_path


@pytest.mark.parametrize("key", [k for k in CONFIGS if k[1] == "q"])
def test_guide_model_q_type(key: tuple[str, str], backbone_dir: Path, tmp_path: Path) -> None:
    model = load_guide_model(guide_dir(backbone_dir, tmp_path, key))
    assert model.scoring == "q" and model.head.type == key[0]
    model.setup_cache(num_slots=2, max_len=8)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    slots = [model.cache.allocate() for _ in prompts]
    last = model.prefill(slots, prompts)
    scores = model.score_next(last)
    assert scores.shape == SHAPES[key]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            hidden = model.backbone(prompt[None])[0, -1]
            want = model.head(hidden, model.backbone.output_embedding)
            torch.testing.assert_close(scores[row], want, atol=1e-4, rtol=0)
    if key[0] == "lm":
        assert torch.equal(scores, model.backbone.logits(last))
    # The given next tokens only: the same scores (normalised over the vocabulary for lm heads).
    tokens = torch.tensor([[3, 0, 7], [7, 7, 1]])
    want = torch.log_softmax(scores, dim=-1) if key[0] == "lm" else scores
    picked = model.score_next_tokens(last, tokens)
    for row in range(2):
        torch.testing.assert_close(picked[row], want[row, tokens[row]], atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="use score_next"):
        model.score_candidates(torch.tensor(slots), torch.tensor([[1], [2]]))


@pytest.mark.parametrize("key", [k for k in CONFIGS if k[1] == "v"])
def test_guide_model_v_type(key: tuple[str, str], backbone_dir: Path, tmp_path: Path) -> None:
    model = load_guide_model(guide_dir(backbone_dir, tmp_path, key))
    assert model.scoring == "v"
    model.setup_cache(num_slots=2, max_len=8)
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    slots = [model.cache.allocate() for _ in prompts]
    model.prefill(slots, prompts)
    candidates = torch.tensor([[1, 2, 3], [4, 4, 0]])
    scores = model.score_candidates(torch.tensor(slots), candidates)
    assert scores.shape == SHAPES[key]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for j, cand in enumerate(candidates[row]):
                hidden = model.backbone(torch.cat((prompt, cand[None]))[None])[0, -1]
                torch.testing.assert_close(scores[row, j], model.head(hidden), atol=1e-4, rtol=0)
    with pytest.raises(RuntimeError, match="use score_candidates"):
        model.score_next(torch.zeros(2, H))


def test_guide_model_rejects_mismatched_head(backbone_dir: Path) -> None:
    backbone = load_decoder(backbone_dir)
    with pytest.raises(ValueError, match="vocab=50"):
        GuideModel(backbone, build_head({"type": "expected"}, H, 50))
    backbone.lm_head = None  # headless backbone: value heads fine, token-scoring heads not
    GuideModel(backbone, build_head({"type": "expected"}, H, V))
    with pytest.raises(ValueError, match="'arm' head scores tokens through the LM head"):
        GuideModel(backbone, build_head(CONFIGS[("arm", "q")], H, V))
