"""The KV cache: one fixed-size slot per running sequence, so memory is bounded by configuration.

Layout per layer: keys and values `[num_slots, kv_heads, max_len, head_dim]`. A sequence owns one
slot from admission to finish; position p of its keys lives at `[slot, :, p]`. A finished
sequence's slot may stay allocated, idle, holding its tokens for the prefix cache
(serve/prefix_cache.py, which hands out the slots). Sequences of different
lengths decode together: each step reads the batch's slots (as one view over their span when
they sit close together, else gathered) and masks every position at or beyond each sequence's
length. We chose per-sequence slots over a paged cache for
simplicity: the cost is that every slot reserves `max_len` positions, so memory is
`2 * layers * num_slots * max_len * kv_heads * head_dim * itemsize`, known at start-up.
"""

from __future__ import annotations

import torch

from mintvcs.errors import MintError


class KVCacheFull(MintError):
    """No free sequence slot is left in the KV cache."""


class KVCache:
    """Per-sequence key/value slots for every layer, allocated once."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        scratch: bool = False,
    ) -> None:
        if num_slots < 1 or max_len < 1:
            raise ValueError(f"num_slots ({num_slots}) and max_len ({max_len}) must be positive")
        self.num_slots = num_slots
        self.max_len = max_len
        # Slot 0 is never handed out when `scratch`: padding rows of a fixed-shape (CUDA graph)
        # step write there, and as the first slot it lies in every span a step reads.
        self.scratch_slot: int | None = 0 if scratch else None
        self.first_slot = int(
            scratch
        )  # sequences get slots first_slot .. first_slot + num_slots - 1
        shape = (num_slots + int(scratch), kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        # Lowest free slot first keeps running slots dense, which keeps gathers local.
        self._free = list(range(self.first_slot + num_slots - 1, self.first_slot - 1, -1))

    @property
    def nbytes(self) -> int:
        """Bytes held by all key and value tensors."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def free_slots(self) -> int:
        """How many sequence slots are unused."""
        return len(self._free)

    def lowest_free(self) -> int | None:
        """The slot allocate() would hand out next; None when none is free."""
        return min(self._free) if self._free else None

    def allocate(self) -> int:
        """Take the lowest free slot; raise KVCacheFull when none is left."""
        if not self._free:
            raise KVCacheFull(
                f"all {self.num_slots} KV slots are in use; raise max_batch_size or wait"
            )
        self._free.sort(reverse=True)
        return self._free.pop()

    def free(self, slot: int) -> None:
        """Return `slot` to the pool; its contents are overwritten by the next owner's prefill."""
        if slot in self._free or not self.first_slot <= slot < self.first_slot + self.num_slots:
            raise ValueError(f"KV slot {slot} is not allocated")
        self._free.append(slot)

    def write(
        self,
        layer: int,
        slots: torch.Tensor,
        positions: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store k, v `[tokens, kv_heads, head_dim]` at (slots[t], positions[t])."""
        self.keys[layer][slots, :, positions] = k
        self.values[layer][slots, :, positions] = v

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copy positions [0, length) of slot `src` into slot `dst`, every layer (a forked prompt,
        a prefix-cache hit, or an idle slot's contents moved)."""
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def gather(
        self, layer: int, slots: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[len(slots), kv_heads, length, head_dim]` of the given slots."""
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]
