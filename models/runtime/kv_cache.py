"""Paged key/value cache indexed by slot.

One slot holds the keys and values of one sequence (one guided request). Storage
is one pool of fixed-size blocks shared by all slots,
``kv [layers, 2, num_blocks, kv_heads, block_size, head_dim]`` (index 0 of dim 1 =
keys, 1 = values), allocated once. Token ``p`` of slot ``s`` lives in block
``block_table[s, p // block_size]`` at offset ``p % block_size``. A slot takes blocks
from the free list as it grows and gives them all back when it is freed or reset,
so memory follows the tokens actually cached, not ``num_slots x max_len``.

Lengths are kept twice: on the host (``length(slot)``, the source of truth) and on
the device (``lengths``, copied host -> device on each change, never read back).
The host copy lets the decoder size its attention window and take blocks with no
device -> host sync; the device copy gives it each row's position.

Allocation of slots and blocks is host-side bookkeeping. ``reserve`` checks a whole
prefill or step (slots allocated and distinct, ``max_len``, free blocks) before it
changes anything, so a refused call leaves every slot as it was.

Sizing from memory: one block holds ``layers * 2 * kv_heads * block_size * head_dim``
elements, so a budget of ``budget`` bytes holds ``budget // bytes_per_block(...)``
blocks (``blocks_in_budget``), i.e. that many times ``block_size`` tokens over all slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class SlotsExhaustedError(RuntimeError):
    """Every slot of the cache is in use."""


class BlocksExhaustedError(SlotsExhaustedError):
    """The free blocks cannot hold the tokens a prefill or step would add (nothing was changed)."""


class PagedKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        num_blocks: int | None = None,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        """``num_blocks=None``: enough for every slot at ``max_len`` (the worst case, never exhausted)."""
        if num_slots < 1 or max_len < 1 or block_size < 1:
            raise ValueError(f"num_slots={num_slots}, max_len={max_len} and block_size={block_size} must be >= 1")
        self.num_slots, self.max_len, self.block_size = num_slots, max_len, block_size
        self.max_blocks_per_slot = -(-max_len // block_size)
        if num_blocks is None:
            num_blocks = num_slots * self.max_blocks_per_slot
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1 (is the memory budget below one block?)")
        self.num_blocks = num_blocks
        self.kv = torch.zeros(
            num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype, device=device
        )
        # Entries past a slot's blocks are stale but valid block ids: reads there are masked, never written.
        self.block_table = torch.zeros(num_slots, self.max_blocks_per_slot, dtype=torch.long, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # device copy of _lengths
        self._lengths = [0] * num_slots  # tokens cached per slot (host, source of truth)
        self._blocks: list[list[int]] = [[] for _ in range(num_slots)]  # block ids held per slot, in order
        self._free = list(range(num_slots - 1, -1, -1))  # stacks: lowest slot / block is handed out first
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._allocated: set[int] = set()

    @staticmethod
    def bytes_per_block(
        num_layers: int, num_kv_heads: int, head_dim: int, block_size: int = 16, dtype: torch.dtype = torch.float32
    ) -> int:
        """Bytes of one block over all layers: layers * 2 (K, V) * kv_heads * block_size * head_dim * dtype size."""
        return num_layers * 2 * num_kv_heads * block_size * head_dim * dtype.itemsize

    @classmethod
    def blocks_in_budget(
        cls,
        budget_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
    ) -> int:
        """``num_blocks`` that fit in ``budget_bytes`` of K/V storage: ``budget_bytes // bytes_per_block``."""
        return budget_bytes // cls.bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, dtype)

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free(self) -> int:
        """Free slots."""
        return len(self._free)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._allocated

    def length(self, slot: int) -> int:
        """Tokens cached in ``slot`` (host copy: no sync)."""
        return self._lengths[slot]

    def slot_blocks(self, slot: int) -> tuple[int, ...]:
        """Block ids held by ``slot``, in token order."""
        return tuple(self._blocks[slot])

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens of one slot: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    def window(self, num_tokens: int) -> int:
        """K/V length attended by a batch whose longest row holds ``num_tokens`` tokens.

        ``blocks_needed(num_tokens)`` = n blocks rounded up to a multiple of q = 2^(bits(n - 1) - 4)
        (q = 1 below 17 blocks; at least one block, at most ``max_blocks_per_slot``), times
        ``block_size``: eight shapes per doubling of the length, so the cost follows the live
        length (at most 1/8 over it, rounded to a block), never ``max_len``. Power-of-two windows
        attended up to twice the live length, and their gathers and matmuls cost that.
        """
        blocks = max(self.blocks_needed(num_tokens), 1)
        quantum = 1 << max((blocks - 1).bit_length() - 4, 0)
        return min(-(-blocks // quantum) * quantum, self.max_blocks_per_slot) * self.block_size

    # ----------------------------------------------------------------- slots

    def allocate(self) -> int:
        """Take a free slot, emptied (length 0, no blocks)."""
        if not self._free:
            raise SlotsExhaustedError(f"all {self.num_slots} KV-cache slots are in use")
        slot = self._free.pop()
        self._allocated.add(slot)
        return slot

    def free(self, slot: int) -> None:
        """Give a slot and its blocks back; their contents become garbage."""
        self.reset(slot)
        self._allocated.remove(slot)
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Empty a slot (its blocks go back to the free list) but keep it allocated."""
        self.check_allocated(slot)
        self._free_blocks.extend(reversed(self._blocks[slot]))
        self._blocks[slot] = []
        self._lengths[slot] = 0
        self.lengths[slot] = 0

    def check_allocated(self, slot: int) -> None:
        if slot not in self._allocated:
            raise ValueError(f"KV-cache slot {slot} is not allocated")

    # ----------------------------------------------------------------- growth

    def new_blocks_needed(self, slots: Sequence[int], new_tokens: Sequence[int]) -> int:
        """Free blocks that appending ``new_tokens[b]`` tokens to each ``slots[b]`` would take.

        Raises:
            ValueError: a slot is not allocated, listed twice, or would pass ``max_len``.
        """
        if len(set(slots)) != len(slots):
            raise ValueError(f"duplicate slots: {list(slots)}")
        needed = 0
        for slot, n in zip(slots, new_tokens, strict=True):
            self.check_allocated(slot)
            end = self._lengths[slot] + n
            if end > self.max_len:
                raise ValueError(f"slot {slot} would hold {end} tokens, over the cache max_len={self.max_len}")
            needed += max(self.blocks_needed(end) - len(self._blocks[slot]), 0)
        return needed

    def can_grow(self, slots: Sequence[int], new_tokens: Sequence[int]) -> bool:
        """Whether the free blocks hold ``new_tokens[b]`` more tokens in each ``slots[b]`` (see ``reserve``).

        Raises ValueError, as ``new_blocks_needed``, on a call that no number of free blocks would allow."""
        return self.new_blocks_needed(slots, new_tokens) <= len(self._free_blocks)

    def reserve(self, slots: Sequence[int], new_tokens: Sequence[int]) -> None:
        """Give each ``slots[b]`` the blocks for ``new_tokens[b]`` more tokens; lengths are unchanged.

        Everything is checked before anything changes. Blocks a slot holds past its length
        (a call whose forward failed) count towards its next growth.

        Raises:
            ValueError: as ``new_blocks_needed``.
            BlocksExhaustedError: fewer free blocks than needed.
        """
        needed = self.new_blocks_needed(slots, new_tokens)
        if needed > len(self._free_blocks):
            raise BlocksExhaustedError(
                f"{needed} KV-cache blocks needed, {len(self._free_blocks)} of {self.num_blocks} free "
                f"(block_size={self.block_size})"
            )
        if needed == 0:
            return
        taken = []  # (slot, column of its table, block id)
        for slot, n in zip(slots, new_tokens):
            held = self._blocks[slot]
            for col in range(len(held), self.blocks_needed(self._lengths[slot] + n)):
                held.append(self._free_blocks.pop())
                taken.append((slot, col, held[-1]))
        update = self._to_device(list(zip(*taken)))
        self.block_table[update[0], update[1]] = update[2]

    def advance(self, slots: Sequence[int], new_tokens: Sequence[int]) -> None:
        """Count ``new_tokens[b]`` more tokens in each ``slots[b]`` (written after ``reserve``)."""
        for slot, n in zip(slots, new_tokens):
            self._lengths[slot] += n
        update = self._to_device([list(slots), [self._lengths[s] for s in slots]])
        self.lengths[update[0]] = update[1]

    def _to_device(self, values: list) -> Tensor:
        # Host -> device copy: no wait on queued device work (a device -> host read would).
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)

    def index(self, slots: Sequence[int]) -> Tensor:
        """Slot ids as a long tensor on the cache device."""
        return self._to_device(list(slots))

    # ----------------------------------------------------------------- storage

    def locate(self, slots: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Storage address (block ``[N]``, offset ``[N]``) of token ``positions[n]`` of ``slots[n]``."""
        return self.block_table[slots, positions // self.block_size], positions % self.block_size

    def write(self, layer: int, where: tuple[Tensor, Tensor], k: Tensor, v: Tensor) -> None:
        """Store one key/value per entry at ``where = locate(...)``.

        Args:
            where: (block, offset) ``[N]`` long tensors; the pairs must be distinct.
            k, v: ``[N, kv_heads, head_dim]``.
        """
        # Two advanced indices split by a slice put the indexed dim first: target is [N, 2, kv_heads, head_dim].
        self.kv[layer][:, where[0], :, where[1]] = torch.stack((k, v), dim=1)

    def read(self, layer: int, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Gather the keys and values held in ``blocks`` ``[B, n]`` (rows of ``block_table``).

        Returns:
            k, v: ``[B, kv_heads, n * block_size, head_dim]``; token ``j`` of row ``b`` is position ``j``
            of that slot when ``blocks[b]`` is its table's first ``n`` entries (garbage past its length: mask it).
        """
        B, n = blocks.shape
        # index_select copies whole blocks (contiguous [kv_heads, block_size, D] runs), then one reshape puts
        # the heads first: 2-3x faster than one advanced-index gather, which copies element by element.
        kv = self.kv[layer].index_select(1, blocks.reshape(-1))  # [2, B * n, kv_heads, block_size, D]
        kv = kv.view(2, B, n, *kv.shape[2:]).transpose(2, 3).flatten(3, 4)  # [2, B, kv_heads, n * block_size, D]
        return kv[0], kv[1]
