"""Static key/value cache indexed by slot.

One slot holds the keys and values of one sequence (one guided request). The
storage is preallocated once, ``[layers, 2, slots, kv_heads, max_len, head_dim]``
(index 0 of dim 1 = keys, 1 = values), so per-token updates are in-place
scatters with no allocation. Per-slot lengths live on the device: the decoder
reads a row's next position from them without a host sync.

Allocation (``allocate``/``free``/``reset``) is host-side bookkeeping, done when
requests join or leave, never per token.
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotsExhaustedError(RuntimeError):
    """Every slot of the cache is in use."""


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots={num_slots} and max_len={max_len} must be >= 1")
        self.num_slots = num_slots
        self.max_len = max_len
        self.kv = torch.zeros(num_layers, 2, num_slots, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.lengths = torch.zeros(num_slots, dtype=torch.long, device=device)  # tokens cached per slot
        self._free = list(range(num_slots - 1, -1, -1))  # stack: lowest slot is handed out first
        self._allocated: set[int] = set()

    @property
    def device(self) -> torch.device:
        return self.kv.device

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_allocated(self, slot: int) -> bool:
        return slot in self._allocated

    def allocate(self) -> int:
        """Take a free slot, emptied (length 0)."""
        if not self._free:
            raise SlotsExhaustedError(f"all {self.num_slots} KV-cache slots are in use")
        slot = self._free.pop()
        self._allocated.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its contents become garbage."""
        self._check_allocated(slot)
        self._allocated.remove(slot)
        self._free.append(slot)

    def reset(self, slot: int) -> None:
        """Empty a slot but keep it allocated."""
        self._check_allocated(slot)
        self.lengths[slot] = 0

    def _check_allocated(self, slot: int) -> None:
        if slot not in self._allocated:
            raise ValueError(f"KV-cache slot {slot} is not allocated")

    def write(self, layer: int, slots: Tensor, positions: Tensor, k: Tensor, v: Tensor) -> None:
        """Scatter one key/value per entry: ``kv[layer, :, slots[n], :, positions[n]] = (k[n], v[n])``.

        Args:
            slots, positions: ``[N]`` long tensors; (slot, position) pairs must be distinct.
            k, v: ``[N, kv_heads, head_dim]``.
        """
        # Two advanced indices split by a slice put the indexed dim first: target is [N, 2, kv_heads, head_dim].
        self.kv[layer][:, slots, :, positions] = torch.stack((k, v), dim=1)

    def read(self, layer: int, slots: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
        """Gather keys and values of ``slots`` (``[B]``) up to ``length`` (default ``max_len``).

        Returns:
            k, v: ``[B, kv_heads, length, head_dim]`` (positions past a slot's length are garbage; mask them).
        """
        kv = self.kv[layer][:, slots, :, : self.max_len if length is None else length]
        return kv[0], kv[1]
