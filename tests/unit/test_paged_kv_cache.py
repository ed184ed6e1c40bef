"""Paged KV cache: cached paths equal a full recompute (``Decoder.forward``) as blocks are taken,
shared and given back; exhaustion refuses a call before it changes anything; the attention
window follows the live length, never ``max_len``."""

from __future__ import annotations

import pytest
import torch

from models.runtime import BlocksExhaustedError, Decoder, DecoderConfig, PagedKVCache, SlotsExhaustedError
from models.runtime.decoder import attend_causal, attend_prefix_and_self
from tests.host_syncs import forbid_host_syncs

ATOL = 1e-5
VOCAB = 100
# (attention heads, kv heads): grouped-query, multi-query, multi-head.
HEADS = {"gqa": (4, 2), "mqa": (4, 1), "mha": (2, 2)}


def decoder(heads: str = "gqa", seed: int = 0) -> Decoder:
    n_heads, n_kv = HEADS[heads]
    config = DecoderConfig.from_dict(
        dict(model_type="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=16)
    )
    torch.manual_seed(seed)
    dec = Decoder(config).eval()
    with torch.no_grad():
        for p in dec.parameters():  # large enough that a wrong position or key moves the output by ~0.1
            p.normal_(std=0.3)
    return dec


def sequence(length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def full(dec: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """Hidden state of every prefix of ``ids`` ``[T]`` by a full causal recompute, ``[T, H]``."""
    with torch.no_grad():
        return dec(ids[None])[0]


def snapshot(cache: PagedKVCache) -> dict:
    return dict(
        kv=cache.kv.clone(), table=cache.block_table.clone(), lengths=cache.lengths.clone(),
        host=[cache.length(s) for s in range(cache.num_slots)],
        blocks=[cache.slot_blocks(s) for s in range(cache.num_slots)],
        free_blocks=list(cache._free_blocks), free_slots=cache.num_free,
    )


def assert_unchanged(cache: PagedKVCache, before: dict) -> None:
    after = snapshot(cache)
    for key in ("kv", "table", "lengths"):
        assert torch.equal(after[key], before[key]), key
    for key in ("host", "blocks", "free_blocks", "free_slots"):
        assert after[key] == before[key], key


class Rows:
    """Drives a decoder's cache and checks every hidden state against a full recompute."""

    def __init__(self, dec: Decoder, cache: PagedKVCache) -> None:
        self.dec, self.cache = dec, cache
        self.seq: dict[str, torch.Tensor] = {}
        self.want: dict[str, torch.Tensor] = {}
        self.slot: dict[str, int] = {}
        self.pos: dict[str, int] = {}

    def join(self, lengths: dict[str, int], seed: int = 0) -> None:
        for name in lengths:
            self.seq[name] = sequence(64, seed=100 * seed + ord(name))
            self.want[name] = full(self.dec, self.seq[name])
            self.slot[name] = self.cache.allocate()
            self.pos[name] = 0
        self.extend(lengths)

    def extend(self, lengths: dict[str, int]) -> None:
        names = list(lengths)
        hidden = self.dec.prefill(
            [self.slot[n] for n in names], [self.seq[n][self.pos[n] : self.pos[n] + lengths[n]] for n in names]
        )
        for row, name in enumerate(names):
            self.pos[name] += lengths[name]
            torch.testing.assert_close(hidden[row], self.want[name][self.pos[name] - 1], atol=ATOL, rtol=0)

    def step(self, names: str) -> None:
        hidden = self.dec.step([self.slot[n] for n in names], torch.stack([self.seq[n][self.pos[n]] for n in names]))
        for row, name in enumerate(names):
            torch.testing.assert_close(hidden[row], self.want[name][self.pos[name]], atol=ATOL, rtol=0)
            self.pos[name] += 1

    def score(self, names: str, k: int = 3) -> None:
        candidates = torch.randint(0, VOCAB, (len(names), k), generator=torch.Generator().manual_seed(k))
        before = snapshot(self.cache)
        hidden = self.dec.score_candidates([self.slot[n] for n in names], candidates)
        assert_unchanged(self.cache, before)
        for row, name in enumerate(names):
            prefix = self.seq[name][: self.pos[name]]
            for j in range(k):
                want = full(self.dec, torch.cat((prefix, candidates[row, j : j + 1])))[-1]
                torch.testing.assert_close(hidden[row, j], want, atol=ATOL, rtol=0)

    def leave(self, name: str) -> tuple[int, ...]:
        blocks = self.cache.slot_blocks(self.slot[name])
        self.cache.free(self.slot.pop(name))
        return blocks

    def check_lengths(self) -> None:
        for name, slot in self.slot.items():
            assert self.cache.length(slot) == self.cache.lengths[slot] == self.pos[name]
            assert len(self.cache.slot_blocks(slot)) == self.cache.blocks_needed(self.pos[name])


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_rows_join_and_leave_equal_full_recompute(heads: str, block_size: int) -> None:
    """Rows at different lengths, interleaved growth (non-contiguous tables), a row leaving and a new
    one reusing its blocks, and a block size that divides none of the lengths."""
    dec = decoder(heads)
    cache = dec.setup_cache(num_slots=3, max_len=40, num_blocks=-(-40 // block_size) * 2, block_size=block_size)
    rows = Rows(dec, cache)
    rows.join({"a": 5, "b": 2})  # batched prefill, unequal lengths
    for _ in range(4):
        rows.step("ab")
    rows.score("ab")
    rows.join({"c": 7})
    rows.extend({"a": 4, "c": 2})  # a prefill that continues slots
    for _ in range(3):
        rows.step("cab")  # slot order differs from row order
    rows.check_lengths()
    if block_size < 16:
        tables = [cache.slot_blocks(s) for s in rows.slot.values()]
        assert any(list(t) != list(range(t[0], t[0] + len(t))) for t in tables), "growth interleaves blocks"
    freed = rows.leave("a")
    free_before = cache.num_free_blocks
    rows.join({"d": 3}, seed=1)
    assert set(cache.slot_blocks(rows.slot["d"])) <= set(freed), "d takes a's blocks back first"
    assert cache.num_free_blocks == free_before - cache.blocks_needed(3)
    for _ in range(5):
        rows.step("bdc")
    rows.score("dcb", k=4)
    rows.check_lengths()


def test_score_candidates_of_empty_slot_and_single_row() -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=2, max_len=8, block_size=4)
    rows = Rows(dec, cache)
    rows.join({"a": 6})
    rows.slot["e"], rows.pos["e"], rows.seq["e"] = cache.allocate(), 0, sequence(8, 9)
    rows.score("ae")  # "e" holds nothing: its candidates see only themselves
    rows.score("e")


def test_step_takes_slots_as_tensor_or_ints() -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=2, max_len=8, block_size=2)
    rows = Rows(dec, cache)
    rows.join({"a": 3, "b": 1})
    tokens = torch.stack([rows.seq[n][rows.pos[n]] for n in "ab"])
    slots = [rows.slot[n] for n in "ab"]
    hidden = dec.step(torch.tensor(slots), tokens)
    for row, name in enumerate("ab"):
        torch.testing.assert_close(hidden[row], rows.want[name][rows.pos[name]], atol=ATOL, rtol=0)
    assert [cache.length(s) for s in slots] == [4, 2]


def test_blocks_returned_on_free_and_reset() -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=2, max_len=20, num_blocks=6, block_size=4)
    assert (cache.num_blocks, cache.block_size, cache.num_free_blocks) == (6, 4, 6)
    a, b = cache.allocate(), cache.allocate()
    dec.prefill([a, b], [sequence(9, 1), sequence(4, 2)])
    assert cache.num_free_blocks == 6 - 3 - 1
    dec.step([a, b], torch.tensor([1, 2]))  # b crosses into a second block, a stays in its third
    assert (len(cache.slot_blocks(a)), len(cache.slot_blocks(b)), cache.num_free_blocks) == (3, 2, 1)
    cache.reset(a)
    assert cache.length(a) == cache.lengths[a] == 0 and cache.slot_blocks(a) == () and cache.num_free_blocks == 4
    cache.free(b)
    assert cache.num_free_blocks == 6 and cache.num_free == 1
    c = cache.allocate()
    assert c == b and cache.length(c) == 0 and cache.slot_blocks(c) == ()


def test_exhaustion_refuses_before_changing_anything() -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=3, max_len=64, num_blocks=5, block_size=4)
    rows = Rows(dec, cache)
    rows.join({"a": 7, "b": 4})  # a: 2 blocks, b: 1 block (full), 2 free
    rows.join({"c": 4})  # c: 1 block (full), 1 free
    assert cache.num_free_blocks == 1

    # A prefill whose first row fits and second does not: nothing is written, taken or counted.
    assert not cache.can_grow([rows.slot["a"], rows.slot["b"]], [2, 5])
    before = snapshot(cache)
    with pytest.raises(BlocksExhaustedError, match="3 KV-cache blocks needed, 1 of 5 free"):
        dec.prefill([rows.slot["a"], rows.slot["b"]], [sequence(2, 3), sequence(5, 4)])
    assert_unchanged(cache, before)

    # A step where b and c both cross into a new block: 2 needed, 1 free.
    assert cache.can_grow([rows.slot["a"], rows.slot["b"]], [1, 1])
    assert not cache.can_grow([rows.slot[n] for n in "abc"], [1, 1, 1])
    with pytest.raises(BlocksExhaustedError) as refused:
        dec.step([rows.slot[n] for n in "abc"], torch.tensor([1, 2, 3]))
    assert isinstance(refused.value, SlotsExhaustedError)
    assert_unchanged(cache, before)

    rows.step("ab")  # fits, and takes the last block
    rows.score("abc")
    assert cache.num_free_blocks == 0
    rows.leave("a")
    assert cache.num_free_blocks == 2 and cache.can_grow([rows.slot[n] for n in "bc"], [1, 1])
    rows.step("cb")  # works once blocks are back, on the values cached before the refusals
    rows.check_lengths()


def test_refused_arguments_change_nothing() -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=3, max_len=6, block_size=4)
    a, b = cache.allocate(), cache.allocate()
    dec.prefill([a, b], [sequence(6, 1), sequence(2, 2)])
    before = snapshot(cache)
    with pytest.raises(ValueError, match="over the cache max_len=6"):
        dec.step([b, a], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        dec.step([b, 2], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="duplicate"):
        dec.step([b, b], torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        dec.score_candidates([2], torch.tensor([[1]]))
    with pytest.raises(ValueError, match="slot 2 is not allocated"):
        cache.can_grow([2], [1])
    assert_unchanged(cache, before)


def test_sizing_from_a_byte_budget() -> None:
    dec = decoder()  # 2 layers, 2 kv heads, head_dim 16
    per_block = 2 * 2 * 2 * 8 * 16 * 4  # layers * (K, V) * kv_heads * block_size * head_dim * float32
    assert PagedKVCache.bytes_per_block(2, 2, 16, block_size=8) == per_block
    assert PagedKVCache.bytes_per_block(2, 2, 16, 8, torch.bfloat16) == per_block // 2
    budget = 10 * per_block + per_block - 1
    assert dec.blocks_in_budget(budget, block_size=8) == 10
    cache = dec.setup_cache(num_slots=4, max_len=1000, num_blocks=dec.blocks_in_budget(budget, 8), block_size=8)
    assert cache.num_blocks == 10 and cache.kv.numel() * cache.kv.element_size() == 10 * per_block <= budget
    assert dec.setup_cache(num_slots=4, max_len=20, block_size=8).num_blocks == 4 * 3, "default: worst case"
    with pytest.raises(ValueError, match="below one block"):
        dec.setup_cache(num_slots=1, max_len=8, num_blocks=dec.blocks_in_budget(per_block - 1, 8), block_size=8)


def test_window_follows_live_length() -> None:
    cache = PagedKVCache(num_layers=1, num_slots=1, num_kv_heads=1, max_len=50, head_dim=2, block_size=4)
    assert cache.max_blocks_per_slot == 13
    got = {n: cache.window(n) for n in (0, 1, 4, 5, 9, 16, 17, 33, 50)}
    assert got == {0: 4, 1: 4, 4: 4, 5: 8, 9: 12, 16: 16, 17: 20, 33: 36, 50: 52}
    long = PagedKVCache(num_layers=1, num_slots=1, num_kv_heads=1, max_len=1 << 20, head_dim=2, block_size=16)
    # Past 16 blocks the window grows in steps of 1/8 of a doubling: never more than 1/8 over the live blocks.
    assert [long.window(16 * n) // 16 for n in (16, 17, 18, 33, 100, 1024, 1025)] == [16, 18, 18, 36, 104, 1024, 1152]
    for n in range(1, 5000):
        assert n <= long.window(16 * n) // 16 <= n * 9 / 8


def test_attention_cost_does_not_depend_on_max_len(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million-token max_len with an 8-block pool: the K/V every layer attends to is sized by the
    batch's longest live row, and the results equal a full recompute."""
    dec = decoder()
    cache = dec.setup_cache(num_slots=2, max_len=1_000_000, num_blocks=8, block_size=4)
    assert cache.kv.shape[2] == 8 and cache.block_table.shape == (2, 250_000)
    seen: list[int] = []
    read = PagedKVCache.read

    def spy(self: PagedKVCache, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = read(self, layer, blocks)
        seen.append(k.shape[2])
        return k, v

    monkeypatch.setattr(PagedKVCache, "read", spy)
    rows = Rows(dec, cache)
    rows.join({"a": 5, "b": 2})
    assert seen == [8, 8]  # prefill: 5 tokens -> 2 blocks
    seen.clear()
    for _ in range(4):
        rows.step("ab")  # a holds 5..8 before each step: 2 blocks
    assert seen == [8] * 8
    seen.clear()
    rows.step("ab")  # a holds 9: 3 blocks (no rounding below 17 blocks)
    rows.score("ab")
    assert seen == [12] * 4
    rows.check_lengths()


def test_attention_parts_equal_one_softmax() -> None:
    """attend_prefix_and_self == masked softmax over [prefix..., self] (GQA, an empty prefix row)."""
    g = torch.Generator().manual_seed(0)
    B, H, G, T, L, D = 3, 6, 2, 4, 5, 8
    q, kp, vp = (torch.randn(*s, generator=g) for s in ((B, H, T, D), (B, G, L, D), (B, G, L, D)))
    ks, vs = torch.randn(B, G, T, D, generator=g), torch.randn(B, G, T, D, generator=g)
    prefix = torch.arange(L) < torch.tensor([5, 2, 0])[:, None]
    got = attend_prefix_and_self(q, kp, vp, prefix, ks, vs)
    for t in range(T):  # query t sees the prefix and key t only
        k = torch.cat((kp, ks[:, :, t : t + 1]), dim=2)
        v = torch.cat((vp, vs[:, :, t : t + 1]), dim=2)
        mask = torch.cat((prefix, torch.ones(B, 1, dtype=torch.bool)), dim=1)[:, None, None]
        want = attend_causal(q[:, :, t : t + 1], k, v, mask)
        torch.testing.assert_close(got[:, :, t : t + 1], want, atol=1e-6, rtol=0)


def test_hot_paths_make_no_host_syncs_while_taking_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    dec = decoder()
    cache = dec.setup_cache(num_slots=2, max_len=16, block_size=1)  # every step takes a block
    slots = [cache.allocate(), cache.allocate()]
    dec.prefill(slots, [torch.tensor([1, 2, 3]), torch.tensor([4])])

    forbid_host_syncs(monkeypatch)
    for token in range(3):
        dec.step(slots, torch.tensor([5, token]))
        dec.score_candidates(slots, torch.tensor([[1, 2], [3, 4]]))
    monkeypatch.undo()
    assert [cache.length(s) for s in slots] == [6, 4] and cache.num_free_blocks == 32 - 10
