"""Guide-model runtime decoder against transformers on the same tiny random weights."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.runtime import CheckpointError, Decoder, DecoderConfig, PagedKVCache, SlotsExhaustedError, load_decoder
from models.runtime.decoder import rope_inv_freq
from tests.host_syncs import forbid_host_syncs

ATOL = 1e-4
TINY = dict(vocab_size=100, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
# initializer_range 0.1 (not 0.02) so that an off-by-one position changes logits by ~0.3, far above ATOL.
VARIANTS = {
    "llama-gqa": (LlamaForCausalLM, LlamaConfig(**TINY, num_key_value_heads=1, head_dim=64, initializer_range=0.1)),
    "qwen2-tied-bias": (
        Qwen2ForCausalLM,
        Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.1),
    ),
    "llama-bias-llama3rope": (
        LlamaForCausalLM,
        LlamaConfig(
            **TINY,
            num_key_value_heads=2,
            head_dim=64,
            initializer_range=0.1,
            attention_bias=True,
            mlp_bias=True,
            max_position_embeddings=64,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
}


def save_tiny(model_cls: type, config: object, path: Path, **save_kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # HF zero-initialises biases: make them matter
                p.normal_(std=0.5)
    model.save_pretrained(path, **save_kwargs)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Decoder]:
    """(transformers reference, our decoder loaded from its save_pretrained directory)."""
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(*VARIANTS[request.param], path)
    return ref, load_decoder(path)


def ref_logits(ref: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``[T]`` -> transformers logits ``[T, V]``."""
    with torch.no_grad():
        return ref(ids[None]).logits[0]


def sequences(n: int, length: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 100, (length,), generator=g) for _ in range(n)]


def test_full_forward_matches_transformers(pair: tuple[torch.nn.Module, Decoder]) -> None:
    ref, dec = pair
    ids = torch.stack(sequences(3, 20))
    with torch.no_grad():
        torch.testing.assert_close(dec.logits(dec(ids)), ref(ids).logits, atol=ATOL, rtol=0)


def test_prefill_then_step_equals_full_recompute(pair: tuple[torch.nn.Module, Decoder]) -> None:
    ref, dec = pair
    (seq,) = sequences(1, 16)
    want = ref_logits(ref, seq)
    dec.setup_cache(num_slots=2, max_len=16)
    slot = dec.cache.allocate()
    torch.testing.assert_close(dec.logits(dec.prefill([slot], [seq[:5]]))[0], want[4], atol=ATOL, rtol=0)
    slots = torch.tensor([slot])
    for t in range(5, 16):
        torch.testing.assert_close(dec.logits(dec.step(slots, seq[t : t + 1]))[0], want[t], atol=ATOL, rtol=0)
    assert dec.cache.lengths[slot] == 16


def test_prefill_continues_a_slot(pair: tuple[torch.nn.Module, Decoder]) -> None:
    ref, dec = pair
    (seq,) = sequences(1, 12)
    dec.setup_cache(num_slots=1, max_len=12)
    slot = dec.cache.allocate()
    dec.prefill([slot], [seq[:4]])
    h = dec.prefill([slot], [seq[4:]])
    torch.testing.assert_close(dec.logits(h)[0], ref_logits(ref, seq)[-1], atol=ATOL, rtol=0)


def test_rows_at_different_positions_match_each_alone(pair: tuple[torch.nn.Module, Decoder]) -> None:
    """Rows join at different times with different prompt lengths, leave, and their slot is reused."""
    ref, dec = pair
    seqs = dict(zip("abcd", sequences(4, 20, seed=2)))
    want = {name: ref_logits(ref, s) for name, s in seqs.items()}
    cache = dec.setup_cache(num_slots=3, max_len=20)
    slot: dict[str, int] = {}
    pos: dict[str, int] = {}  # tokens each row has in the cache

    def join(names: str, lengths: list[int]) -> None:
        for name in names:
            slot[name] = cache.allocate()
        hidden = dec.prefill([slot[n] for n in names], [seqs[n][:k] for n, k in zip(names, lengths)])
        for row, (name, k) in enumerate(zip(names, lengths)):
            torch.testing.assert_close(dec.logits(hidden[row]), want[name][k - 1], atol=ATOL, rtol=0)
            pos[name] = k

    def step(names: str) -> None:
        slots = torch.tensor([slot[n] for n in names])
        hidden = dec.step(slots, torch.stack([seqs[n][pos[n]] for n in names]))
        for row, name in enumerate(names):
            torch.testing.assert_close(dec.logits(hidden[row]), want[name][pos[name]], atol=ATOL, rtol=0)
            pos[name] += 1

    join("a", [3])
    step("a")
    step("a")
    join("bd", [7, 2])  # batched prefill of unequal lengths while "a" holds a slot
    for _ in range(3):
        step("abd")
    cache.free(slot.pop("a"))
    join("c", [4])
    assert slot["c"] == 0, "the freed slot is reused"
    for _ in range(4):
        step("dcb")  # slot order differs from row order
    assert [cache.lengths[slot[n]].item() for n in "bcd"] == [pos[n] for n in "bcd"] == [14, 8, 9]


def test_score_candidates_equals_separate_forwards_and_leaves_cache(pair: tuple[torch.nn.Module, Decoder]) -> None:
    ref, dec = pair
    prefixes = sequences(2, 9, seed=3)
    cache = dec.setup_cache(num_slots=4, max_len=16)
    slots = [cache.allocate() for _ in range(3)]  # the third stays empty: candidates see only themselves
    dec.prefill(slots[:2], [prefixes[0][:4], prefixes[1][:8]])
    dec.step(torch.tensor(slots[:2]), torch.stack([prefixes[0][4], prefixes[1][8]]))
    prefixes = [prefixes[0][:5], prefixes[1], prefixes[1][:0]]
    candidates = torch.tensor([[7, 3, 7, 99, 0], [1, 2, 3, 4, 5], [42, 0, 11, 11, 6]])
    before = cache.kv.clone(), cache.lengths.clone()

    hidden = dec.score_candidates(torch.tensor(slots), candidates)

    assert hidden.shape == (3, 5, 128)
    for row, prefix in enumerate(prefixes):
        for j, cand in enumerate(candidates[row]):
            want = ref_logits(ref, torch.cat((prefix, cand[None])))[-1]
            torch.testing.assert_close(dec.logits(hidden[row, j]), want, atol=ATOL, rtol=0)
    assert torch.equal(cache.kv, before[0]) and torch.equal(cache.lengths, before[1])


def test_hot_paths_make_no_host_syncs(pair: tuple[torch.nn.Module, Decoder], monkeypatch: pytest.MonkeyPatch) -> None:
    _, dec = pair
    cache = dec.setup_cache(num_slots=2, max_len=8)
    slots = [cache.allocate(), cache.allocate()]
    dec.prefill(slots, [torch.tensor([1, 2, 3]), torch.tensor([4])])

    forbid_host_syncs(monkeypatch)
    dec.step(slots, torch.tensor([5, 6]))
    dec.score_candidates(slots, torch.tensor([[1, 2], [3, 4]]))


def test_slot_allocator() -> None:
    cache = PagedKVCache(num_layers=1, num_slots=2, num_kv_heads=1, max_len=4, head_dim=2, block_size=2)
    assert cache.kv.shape == (1, 2, 4, 1, 2, 2), "worst case: 2 slots x 2 blocks of 2 tokens"
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1) and cache.num_free == 0
    with pytest.raises(SlotsExhaustedError, match="all 2"):
        cache.allocate()
    cache.reserve([b], [3])
    cache.advance([b], [3])
    assert cache.length(b) == cache.lengths[b] == 3 and cache.num_free_blocks == 2
    cache.reset(b)
    assert cache.lengths[b] == cache.length(b) == 0 and cache.is_allocated(b) and cache.num_free_blocks == 4
    cache.free(a)
    with pytest.raises(ValueError, match="slot 0 is not allocated"):
        cache.free(a)
    with pytest.raises(ValueError, match="not allocated"):
        cache.reset(a)
    assert cache.allocate() == a and cache.length(a) == cache.lengths[a] == 0, "a reused slot starts empty"


def test_prefill_errors(pair: tuple[torch.nn.Module, Decoder]) -> None:
    _, dec = pair
    dec.cache = None
    with pytest.raises(RuntimeError, match="setup_cache"):
        dec.prefill([0], [torch.tensor([1])])
    cache = dec.setup_cache(num_slots=2, max_len=4)
    s = cache.allocate()
    with pytest.raises(ValueError, match="over the cache max_len=4"):
        dec.prefill([s], [torch.arange(5)])
    with pytest.raises(ValueError, match="slot 1 is not allocated"):
        dec.prefill([1], [torch.tensor([1])])
    with pytest.raises(ValueError, match="duplicate"):
        dec.prefill([s, s], [torch.tensor([1]), torch.tensor([2])])
    with pytest.raises(ValueError, match="empty token sequence"):
        dec.prefill([s], [torch.tensor([], dtype=torch.long)])
    assert cache.lengths[s] == 0, "a refused prefill writes nothing"


# ---------------------------------------------------------------- config


def hf_dict(model_type: str = "llama", **overrides: object) -> dict:
    base = dict(model_type=model_type, **TINY, num_key_value_heads=1)
    return {**base, **overrides}


def test_config_defaults_and_rope_formats() -> None:
    c = DecoderConfig.from_dict(hf_dict(rope_theta=5e5))  # older format: top-level rope_theta
    assert (c.head_dim, c.rope.rope_type, c.rope.rope_theta) == (64, "default", 5e5)
    assert not (c.attention_bias or c.attention_out_bias or c.mlp_bias or c.tie_word_embeddings)
    c = DecoderConfig.from_dict(hf_dict(rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (c.rope.rope_type, c.rope.factor, c.rope.rope_theta) == ("linear", 2.0, 1e4)
    c = DecoderConfig.from_dict(hf_dict("qwen2", rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (c.rope.rope_theta, c.attention_bias, c.attention_out_bias) == (1e6, True, False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(model_type="mistral"), "unsupported model_type 'mistral'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported RoPE scaling type 'yarn'"),
        (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4}), "'dynamic'"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(num_key_value_heads=3), "not a multiple"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
        (
            dict(model_type="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1),
            "sliding-window",
        ),
    ],
)
def test_config_errors(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DecoderConfig.from_dict(hf_dict(**overrides))


def test_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        DecoderConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)
def test_rope_inv_freq_matches_transformers(rope: dict) -> None:
    hf = LlamaConfig(**TINY, head_dim=64, rope_parameters=dict(rope))
    want, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, "cpu")
    got = rope_inv_freq(DecoderConfig.from_dict(hf.to_dict()).rope, 64)
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------- loader


def test_sharded_checkpoint_and_dtype(tmp_path: Path) -> None:
    model_cls, config = VARIANTS["llama-gqa"]
    ref = save_tiny(model_cls, config, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = torch.stack(sequences(2, 8))
    dec = load_decoder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(dec.logits(dec(ids)), ref(ids).logits, atol=ATOL, rtol=0)
    half = load_decoder(tmp_path, dtype=torch.bfloat16)
    assert half.embed_tokens.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    half.setup_cache(1, 8)
    assert half.cache.kv.dtype == torch.bfloat16


@pytest.fixture()
def llama_dir(tmp_path: Path) -> Path:
    save_tiny(*VARIANTS["llama-gqa"], tmp_path)
    return tmp_path


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_loader_missing_unexpected_and_misshaped_weights(llama_dir: Path) -> None:
    edit_weights(llama_dir, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weights: \['layers.1.mlp.up_proj.weight'\]"):
        load_decoder(llama_dir)
    edit_weights(llama_dir, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(256, 128),
                                                 "model.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match=r"unexpected weights: \['extra.weight'\]"):
        load_decoder(llama_dir)
    edit_weights(llama_dir, lambda s: (s.pop("model.extra.weight"), s.update({"lm_head.weight": torch.zeros(3, 3)})))
    with pytest.raises(CheckpointError, match=r"wrongly shaped weights: \['lm_head.weight \(3, 3\) != \(100, 128\)'\]"):
        load_decoder(llama_dir)


def test_loader_headless_backbone_and_missing_files(llama_dir: Path) -> None:
    edit_weights(llama_dir, lambda s: s.pop("lm_head.weight"))
    dec = load_decoder(llama_dir)
    assert dec.lm_head is None
    with pytest.raises(RuntimeError, match="no LM head"):
        dec.logits(torch.zeros(1, 128))
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_decoder(llama_dir)
    (llama_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors"):
        load_decoder(llama_dir)
