"""The torch backend: tokens grouped by slot, shrink and expand as matmuls per active slot.

Two layouts, picked per step from the segment lengths (the plan is cached on the SlotGroups,
so every layer of a step reuses it):
  padded: every active slot's tokens padded to the longest segment, and one batched matmul
          pair covers all slots. Decode batches (at most 32 tokens per slot) take this one:
          a fixed number of torch calls, whatever the number of slots.
  loop:   one matmul pair per active slot on contiguous views. Prefill batches with uneven
          segments take this one, where padding would waste more than the loop costs.
Neither reads lora_a/lora_b past a slot's real rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .groups import SlotGroups


@dataclass(frozen=True)
class _Plan:
    """How one step's tokens map onto matmuls; depends on the groups and the real ranks only."""

    live: tuple[tuple[int, int, int, int], ...]  # (slot, start, end in idx order, real rank)
    idx: torch.Tensor  # [active] token ids, grouped by slot
    in_place: bool  # idx is 0..active-1: rows can be sliced instead of gathered and scattered
    padded: bool
    slots: torch.Tensor  # [A] live slot ids
    length: int  # L, the longest segment
    gather: torch.Tensor  # [A * L] token ids, each segment padded with its own first token
    keep: torch.Tensor | None  # [active] rows of the [A * L] result that are real; None = all
    rank: int  # the largest real rank among live slots
    rank_mask: torch.Tensor | None  # [A, rank] True below each slot's real rank; None = all


def _plan(groups: SlotGroups, rank_of: list[int] | None, rank: int) -> _Plan | None:
    key = ("torch-plan", rank, None if rank_of is None else tuple(rank_of))
    memo = groups.memo
    if key in memo:
        hit = memo[key]
        return hit if isinstance(hit, _Plan) else None
    live = []
    pos = 0
    pieces = []
    for slot, start, end in groups.segments():
        r = rank if rank_of is None else min(max(int(rank_of[slot]), 0), rank)
        if r > 0:  # a rank-0 slot's rows stay out entirely: even y + 0.0 turns -0.0 into 0.0
            live.append((slot, pos, pos + end - start, r))
            pieces.append((start, end))
            pos += end - start
    plan = None
    if live:
        dev = groups.device
        order = groups.sorted_tokens
        # Unless a rank-0 segment was dropped, the live tokens are a prefix of the sorted order.
        idx = order[:pos] if pieces[-1][1] == pos else torch.cat([order[a:b] for a, b in pieces])
        lengths = [e - s for _, s, e, _ in live]
        length = max(lengths)
        # Short segments (decode): one batched matmul beats a Python loop over slots, if
        # padding at most doubles the rows. Long ones (prefill): per-slot matmuls measured
        # faster on CPU even for balanced segments, and they waste nothing.
        padded = length <= 32 and length * len(live) <= 2 * pos
        gather: list[int] = []
        keep: list[int] = []
        ids = idx.tolist()
        for i, (_, s, e, _) in enumerate(live):
            gather += ids[s:e] + [ids[s]] * (length - (e - s))
            keep += range(i * length, i * length + e - s)
        ranks = [r for *_, r in live]
        top = max(ranks)
        mask = None
        if min(ranks) < top:
            mask = torch.arange(top, device=dev)[None, :] < torch.tensor(ranks, device=dev)[:, None]
        plan = _Plan(
            live=tuple(live),
            idx=idx,
            in_place=ids == list(range(pos)),
            padded=padded,
            slots=torch.tensor([s for s, *_ in live], dtype=torch.int64, device=dev),
            length=length,
            gather=torch.tensor(gather, dtype=torch.int64, device=dev),
            keep=None
            if len(keep) == len(gather)
            else torch.tensor(keep, dtype=torch.int64, device=dev),
            rank=top,
            rank_mask=mask,
        )
    memo[key] = plan
    return plan


def add_lora_torch(
    y: torch.Tensor,  # [tokens, sum of slice widths]
    x: torch.Tensor,  # [tokens, in]
    # each slice: (lora_a [slots, rank, in], lora_b [slots, out_i, rank])
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    groups: SlotGroups,
    scales: torch.Tensor,  # [slots]
    slot_ranks: torch.Tensor | None,  # [slots]
) -> torch.Tensor:
    """Apply every slice's LoRA update to y in place; idle tokens' rows are never written."""
    rank = slices[0][0].shape[1]
    if rank == 0 or not groups.segments():
        return y
    plan = _plan(groups, None if slot_ranks is None else slot_ranks.tolist(), rank)
    if plan is None:
        return y
    # CPU matmuls in half types are slow and round every partial sum; compute those in fp32.
    work = torch.float32 if x.device.type == "cpu" and x.dtype != torch.float32 else x.dtype
    if plan.padded:
        deltas = _padded(x, slices, plan, scales, work)
    else:
        deltas = _loop(x, slices, plan, scales, work)
    col = 0
    for (_, b), delta in zip(slices, deltas, strict=True):
        yv = y[:, col : col + b.shape[1]]  # [tokens, out_i], a view: writes land in y
        col += b.shape[1]
        if plan.in_place:  # prefill of requests already in slot order: plain row slices
            rows = yv[: delta.shape[0]]
            if delta.dtype == rows.dtype:
                rows.add_(delta)
            else:
                rows.copy_(rows.to(delta.dtype) + delta)
        elif delta.dtype == yv.dtype:
            yv.index_add_(0, plan.idx, delta)
        else:
            cur = yv.index_select(0, plan.idx).to(delta.dtype)  # [active, out_i]
            cur.add_(delta)
            yv.index_copy_(0, plan.idx, cur.to(yv.dtype))
    return y


def _padded(
    x: torch.Tensor,
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    plan: _Plan,
    scales: torch.Tensor,
    work: torch.dtype,
) -> list[torch.Tensor]:
    num, length, r = len(plan.live), plan.length, plan.rank
    xp = x.index_select(0, plan.gather).view(num, length, -1).to(work)  # [A, L, in]
    scale = scales.index_select(0, plan.slots).to(work).view(num, 1, 1)  # [A, 1, 1]
    all_slots = num == slices[0][0].shape[0]  # then plan.slots is 0..S-1: no weight gather
    out = []
    for a, b in slices:
        # Cut the rank to the largest real one first, so the gather copies no padding.
        a_sel = a[:, :r] if all_slots else a[:, :r].index_select(0, plan.slots)  # [A, r, in]
        b_sel = b[:, :, :r] if all_slots else b[:, :, :r].index_select(0, plan.slots)  # [A, out, r]
        if plan.rank_mask is not None:  # where(), not a product: 0 * NaN would still be NaN
            a_sel = torch.where(plan.rank_mask[:, :, None], a_sel, 0)
            b_sel = torch.where(plan.rank_mask[:, None, :], b_sel, 0)
        h = torch.bmm(xp, a_sel.to(work).transpose(1, 2))  # [A, L, r]
        h.mul_(scale)
        o = torch.bmm(h, b_sel.to(work).transpose(1, 2))  # [A, L, out]
        o = o.view(num * length, -1)
        out.append(o if plan.keep is None else o.index_select(0, plan.keep))  # [active, out]
    return out


def _loop(
    x: torch.Tensor,
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    plan: _Plan,
    scales: torch.Tensor,
    work: torch.dtype,
) -> list[torch.Tensor]:
    # One gather into slot order, then contiguous per-slot views: no index ops in the loop.
    xs = x[: len(plan.idx)] if plan.in_place else x.index_select(0, plan.idx)
    xs = xs.to(work)  # [active, in]
    scale_of = scales.tolist()
    out = []
    for a, b in slices:
        o = torch.empty(xs.shape[0], b.shape[1], dtype=work, device=x.device)  # [active, out]
        for slot, start, end, r in plan.live:
            h = xs[start:end] @ a[slot, :r].to(work).T  # [n, r]; padding rows are never read
            h.mul_(scale_of[slot])
            torch.mm(h, b[slot, :, :r].to(work).T, out=o[start:end])  # [n, out]
        out.append(o)
    return out
