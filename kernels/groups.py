"""Per-step slot grouping: which tokens use which slot, computed once and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .checks import check_slots, slot_count


def block_m_for(num_tokens: int) -> int:
    """The token-block height of the Triton kernels for a batch of num_tokens."""
    # Decode batches give each slot a handful of tokens: a 16-row block (tl.dot's minimum)
    # wastes least. Prefill segments are long, and taller blocks reuse each B tile more.
    if num_tokens <= 64:
        return 16
    if num_tokens <= 512:
        return 32
    return 64


def max_blocks(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound on the token blocks any slot assignment of num_tokens tokens can need."""
    # sum_s ceil(c_s / BM) <= (sum_s c_s + A * (BM - 1)) / BM with A <= min(S, T) active slots.
    active = min(num_slots, num_tokens)
    if active == 0:  # no slots (nothing loaded) or no tokens: no token can be in a block
        return 0
    return (num_tokens + active * (block_m - 1)) // block_m


@dataclass(frozen=True, eq=False)
class Blocks:
    """The Triton grid's view of a SlotGroups: fixed-size token blocks, each inside one slot."""

    block_m: int
    block_slot: torch.Tensor  # [blocks] int32 slot of each token block, -1 = nothing to do
    block_start: torch.Tensor  # [blocks] int32 first position of each block in sorted_tokens


@dataclass(frozen=True, eq=False)
class SlotGroups:
    """Tokens grouped by slot; build it with group_tokens() once per step, pass it to every layer."""

    num_tokens: int
    num_slots: int
    token_slots: torch.Tensor  # [tokens] int32, -1 = no adapter (every index outside 0..S-1)
    sorted_tokens: torch.Tensor  # [tokens] int64 token ids ordered by slot, the -1 tokens last
    counts: torch.Tensor  # [slots] int64 tokens per slot
    slot_start: torch.Tensor  # [slots] int32 first position of each slot in sorted_tokens
    slot_end: torch.Tensor  # [slots] int32 one past its last position (== start if idle)
    # (slot, start, end) of each active slot in sorted_tokens; host ints, built on CPU only
    # because reading them off a GPU would sync.
    host_segments: tuple[tuple[int, int, int], ...] | None
    # Per-step derived data, built on first use and shared by every layer: the Triton blocks
    # (eagerly on a GPU, lazily on CPU where the torch backend never needs them), the torch plan.
    memo: dict[object, object] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        """The device the metadata lives on (that of token_slots)."""
        return self.token_slots.device

    def segments(self) -> tuple[tuple[int, int, int], ...]:
        """(slot, start, end) per active slot; syncs once when the metadata lives on a GPU."""
        if self.host_segments is not None:
            return self.host_segments
        got = self.memo.get("host-segments")
        if not isinstance(got, tuple):
            got = _segments(self.slot_start, self.slot_end)
            self.memo["host-segments"] = got
        return got

    def host_values(self, t: torch.Tensor) -> list[Any]:
        """t's values (per-slot ranks or scales) as host numbers, read again only after t is written.

        Read off a GPU once per step rather than once per layer; an in-place write to t (a slot
        released to rank 0) bumps t's version and so is seen on the next call.
        """
        version = _version(t)
        key = ("host-values", id(t))
        hit = self.memo.get(key)
        if isinstance(hit, tuple) and hit[0] is t and version is not None and hit[1] == version:
            return hit[2]
        values = t.tolist()
        self.memo[key] = (t, version, values)
        return values

    def host_token_slots(self) -> list[int]:
        """token_slots as host ints, read once per step (a sync when they live on a GPU)."""
        got = self.memo.get("host-slots")
        if not isinstance(got, list):
            got = self.token_slots.tolist()
            self.memo["host-slots"] = got
        return got

    def blocks(self) -> Blocks:
        """The token blocks of the Triton grid (computed once, on the metadata's device)."""
        got = self.memo.get("blocks")
        if not isinstance(got, Blocks):
            got = _make_blocks(self.num_tokens, self.num_slots, self.counts, self.slot_start)
            self.memo["blocks"] = got
        return got


def _version(t: torch.Tensor) -> int | None:
    """t's in-place write counter; None for an inference-mode tensor, which keeps none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def _segments(start: torch.Tensor, end: torch.Tensor) -> tuple[tuple[int, int, int], ...]:
    starts, ends = start.tolist(), end.tolist()
    return tuple((s, a, b) for s, (a, b) in enumerate(zip(starts, ends, strict=True)) if b > a)


def _make_blocks(tokens: int, num_slots: int, counts: torch.Tensor, start: torch.Tensor) -> Blocks:
    # Fixed-shape ops only: no sync, so this can sit inside a CUDA graph capture.
    bm = block_m_for(tokens)
    nb = max_blocks(tokens, num_slots, bm)
    if nb == 0:  # no tokens or no slots: an empty grid (the gathers below need a slot to index)
        empty = torch.zeros(0, dtype=torch.int32, device=counts.device)
        return Blocks(block_m=bm, block_slot=empty, block_start=empty)
    blocks_per_slot = (counts + bm - 1) // bm  # [slots]
    blk_end = torch.cumsum(blocks_per_slot, 0)
    blk_begin = blk_end - blocks_per_slot
    b = torch.arange(nb, device=counts.device, dtype=torch.int64)  # [blocks]
    slot_of_block = torch.searchsorted(blk_end, b, right=True)  # == num_slots past the last block
    live = slot_of_block < num_slots
    safe = slot_of_block.clamp(max=num_slots - 1)
    first = start.long()[safe] + (b - blk_begin[safe]) * bm
    return Blocks(
        block_m=bm,
        block_slot=torch.where(live, slot_of_block, torch.full_like(slot_of_block, -1)).to(
            torch.int32
        ),
        block_start=torch.where(live, first, torch.zeros_like(first)).to(torch.int32),
    )


def group_tokens(token_slots: torch.Tensor, num_slots: int, *, validate: bool = True) -> SlotGroups:
    """Group tokens by slot for add_lora; validate=False makes out-of-range indices idle (no GPU sync)."""
    num_slots = slot_count(num_slots)
    check_slots(token_slots, num_slots, validate_values=validate)
    dev = token_slots.device
    tokens = int(token_slots.shape[0])
    # Without validation every index outside 0..S-1 means "no adapter", like -1: a fixed-shape
    # mask, so no sync. Compare before narrowing to int32, which would wrap 2**32 to slot 0.
    live = (token_slots >= 0) & (token_slots < num_slots)
    slots32 = torch.where(live, token_slots, -1).to(torch.int32)
    # Sort key: idle becomes num_slots so idle tokens land after every real segment.
    key = torch.where(live, token_slots, num_slots).long()
    # Stable sort keeps each segment in token order, which keeps results reproducible.
    order = torch.sort(key, stable=True).indices
    # scatter_add_ rather than bincount: bincount sizes its output from the data (a sync on GPU).
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, key, torch.ones_like(key))
    counts = counts[:num_slots]
    end = torch.cumsum(counts, 0)
    start = end - counts
    groups = SlotGroups(
        num_tokens=tokens,
        num_slots=num_slots,
        token_slots=slots32,
        sorted_tokens=order,
        counts=counts,
        slot_start=start.to(torch.int32),
        slot_end=end.to(torch.int32),
        host_segments=_segments(start, end) if dev.type == "cpu" else None,
    )
    if dev.type != "cpu":
        groups.blocks()
    return groups
