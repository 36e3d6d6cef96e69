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

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .checks import LoraShapeError
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
    # Host reads of the step's metadata are memoized on groups: on a GPU each one is a sync.
    plan = _plan(groups, None if slot_ranks is None else groups.host_values(slot_ranks), rank)
    if plan is None:
        return y
    work = work_dtype(x.dtype, x.device)
    if plan.padded:
        deltas = _padded(x, slices, plan, scales, work)
    else:
        deltas = _loop(x, slices, plan, groups.host_values(scales), work)
    col = 0
    for (_, b), delta in zip(slices, deltas, strict=True):
        yv = y[:, col : col + b.shape[1]]  # [tokens, out_i], a view: writes land in y
        col += b.shape[1]
        if plan.in_place:  # prefill of requests already in slot order: plain row slices
            _accumulate(yv[: delta.shape[0]], delta)
        else:
            _accumulate_rows(yv, plan.idx, delta)
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
    scale_of: list[float],
    work: torch.dtype,
) -> list[torch.Tensor]:
    # One gather into slot order, then contiguous per-slot views: no index ops in the loop.
    xs = x[: len(plan.idx)] if plan.in_place else x.index_select(0, plan.idx)
    xs = xs.to(work)  # [active, in]
    out = []
    for a, b in slices:
        o = torch.empty(xs.shape[0], b.shape[1], dtype=work, device=x.device)  # [active, out]
        for slot, start, end, r in plan.live:
            h = xs[start:end] @ a[slot, :r].to(work).T  # [n, r]; padding rows are never read
            h.mul_(scale_of[slot])
            torch.mm(h, b[slot, :, :r].to(work).T, out=o[start:end])  # [n, out]
        out.append(o)
    return out


# ------------------------------------------------------------------------------------ packed form
@dataclass(frozen=True, eq=False)
class PackedLora:
    """A fused layer's adapter factors laid out for batched matmuls on CPU: one shrink per call.

    Slice i of P occupies rank columns i*R .. i*R+R-1 of `a`, which holds each slot's A_i^T there;
    b[i] holds B_i^T. Everything past a slot's real rank is zero, so no rank mask is needed at run
    time. B stays one tensor per slice: a block-diagonal B would be one matmul, but P times the
    bytes, and the expand is bound by reading B (measured slower on CPU for q/k/v and gate/up).
    """

    a: torch.Tensor  # [slots, in, P * R]
    b: tuple[torch.Tensor, ...]  # P x [slots, R, width_i]
    rank: int  # R, the padded rank of each slice
    columns: tuple[tuple[int, int], ...]  # (first output column, width) of each slice
    out_features: int  # the full width of the fused layer's output
    # Per slot, the largest rank pack_slot wrote there over the slices (0 = nothing yet), for
    # add_lora_packed's rank check; empty for a PackedLora built by hand, which is not checked.
    written: list[int] = field(default_factory=list)

    @cached_property
    def slices(self) -> tuple[tuple[int, torch.Tensor, int, int], ...]:
        """(first rank column in a, B_i^T, first output column, width) of each slice."""
        return tuple(
            (i * self.rank, b, col, width)
            for i, (b, (col, width)) in enumerate(zip(self.b, self.columns, strict=True))
        )

    @property
    def nbytes(self) -> int:
        """Bytes held by a and b."""
        return sum(t.numel() * t.element_size() for t in (self.a, *self.b))


def work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the torch backend computes LoRA in: fp32 for half types on CPU, else dtype itself."""
    # CPU matmuls in half types are slow and round every partial sum; compute those in fp32.
    return torch.float32 if device.type == "cpu" and dtype != torch.float32 else dtype


def new_packed(
    num_slots: int,
    in_features: int,
    out_features: int,
    columns: Sequence[tuple[int, int]],
    rank: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> PackedLora:
    """Zeroed packed factors for num_slots slots of a fused layer whose slices sit at `columns`."""
    if min(num_slots, in_features, out_features, rank) < 0:
        raise LoraShapeError(
            f"new_packed takes sizes of 0 or more, got num_slots {num_slots}, in_features "
            f"{in_features}, out_features {out_features}, rank {rank}"
        )
    end = 0
    for col, width in sorted((int(c), int(w)) for c, w in columns):
        if col < end or width < 0 or col + width > out_features:
            raise LoraShapeError(
                f"columns {list(columns)} must be disjoint (first column, width) spans inside "
                f"the {out_features} output features"
            )
        end = col + width
    work = work_dtype(dtype, device)
    return PackedLora(
        a=torch.zeros(num_slots, in_features, len(columns) * rank, dtype=work, device=device),
        b=tuple(
            torch.zeros(num_slots, rank, int(w), dtype=work, device=device) for _, w in columns
        ),
        rank=rank,
        columns=tuple((int(c), int(w)) for c, w in columns),
        out_features=out_features,
        written=[0] * num_slots,
    )


def pack_slot(
    packed: PackedLora,
    slot: int,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
) -> None:
    """Write one slot: factors[i] = (A [r, in], B [width_i, r]) with r <= R, or None for 'no update'."""
    _check_pack(packed, slot, factors)  # everything, so that a bad call leaves the slot as it was
    a, rank = packed.a[slot], packed.rank  # a: [in, P*R]
    top = 0
    # Factors whose transposes are contiguous (A.t().contiguous().t(), as the engine keeps its
    # host copies) copy row by row here; others are transposed on the fly, which is slower.
    for i, (b, pair) in enumerate(zip(packed.b, factors, strict=True)):
        r = 0
        if pair is not None:
            fa, fb = pair
            r = fa.shape[0]
            top = max(top, r)
            a[:, i * rank : i * rank + r].copy_(fa.T)
            b[slot, :r].copy_(fb.T)
        # Zero past this slice's rank: the previous occupant may have had a larger one.
        a[:, i * rank + r : (i + 1) * rank].zero_()
        b[slot, r:].zero_()
    if packed.written:
        packed.written[slot] = top


def _check_pack(packed: PackedLora, slot: object, factors: object) -> None:
    if not isinstance(packed, PackedLora):
        raise LoraShapeError(
            f"packed must be a PackedLora, got {type(packed).__name__}; build it with new_packed()"
        )
    num_slots, in_features, _ = packed.a.shape
    try:
        index = operator.index(slot)  # type: ignore[arg-type]
    except TypeError:
        index = -1
    if not 0 <= index < num_slots:
        raise LoraShapeError(
            f"slot is {slot!r}; pass an int in 0..{num_slots - 1} "
            "(negative indices are refused: -1 would write the last slot)"
        )
    parts = len(packed.b)
    if not isinstance(factors, (list, tuple)) or len(factors) != parts:
        got = (
            f"has {len(factors)} entries"
            if isinstance(factors, (list, tuple))
            else f"is a {type(factors).__name__}"
        )
        raise LoraShapeError(
            f"factors {got}; pass a list of {parts} (one per slice of the fused layer), "
            "each (A [rank, in], B [width, rank]) or None"
        )
    for i, pair in enumerate(factors):
        if pair is None:
            continue
        width = packed.columns[i][1]
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(t, torch.Tensor) for t in pair)
        ):
            raise LoraShapeError(
                f"factors[{i}] is a {type(pair).__name__}; pass (A, B) tensors or None"
            )
        fa, fb = pair
        r = fa.shape[0] if fa.dim() == 2 else -1
        if not (fa.dim() == 2 and fa.shape[1] == in_features and r <= packed.rank):
            raise LoraShapeError(
                f"factors[{i}] A has shape {list(fa.shape)}; expected [rank, {in_features}] "
                f"with rank at most {packed.rank} (the pool's padded rank)"
            )
        if not (fb.dim() == 2 and tuple(fb.shape) == (width, r)):
            raise LoraShapeError(
                f"factors[{i}] B has shape {list(fb.shape)}; expected [{width}, {r}] "
                "= [width of the slice, rank of A]"
            )
        for name, t in (("A", fa), ("B", fb)):
            if not t.is_floating_point():
                raise LoraShapeError(
                    f"factors[{i}] {name} has dtype {t.dtype}; pass floating-point factors"
                )


@dataclass(frozen=True)
class _PackedPlan:
    """How one step's tokens meet packed factors; depends on the token slots and live slots only."""

    # (slot, start, end) per matmul pair when not batched: maximal runs of one live slot in token
    # order, or (grouped) each live slot's segment of `order`
    runs: tuple[tuple[int, int, int], ...]
    order: torch.Tensor | None  # [active] token ids grouped by slot; None = runs index x itself
    batched: bool  # one bmm pair over slots lo .. lo+span-1, each padded to `length` rows
    lo: int
    span: int
    length: int
    direct: bool  # tokens 0 .. span*length-1 already are that layout: views, no copies
    gather: torch.Tensor | None  # [span * length] rows of x in the padded layout
    keep: torch.Tensor | None  # [active] rows of the padded result that hold real tokens
    dest: torch.Tensor | None  # [active] the token each kept row belongs to; None = 0..active-1


# How many padded rows of the batched layout cost about as much as one more matmul run.
_ROWS_PER_RUN = 32


def _packed_plan(groups: SlotGroups, live_slots: tuple[bool, ...]) -> _PackedPlan | None:
    key = ("packed-plan", live_slots)
    memo = groups.memo
    if key in memo:
        hit = memo[key]
        return hit if isinstance(hit, _PackedPlan) else None
    slots = groups.host_token_slots()
    runs: list[tuple[int, int, int]] = []
    per_slot: dict[int, list[int]] = {}
    for t, s in enumerate(slots):
        if s < 0 or not live_slots[s]:
            continue
        per_slot.setdefault(s, []).append(t)
        if runs and runs[-1][0] == s and runs[-1][2] == t:
            runs[-1] = (s, runs[-1][1], t + 1)
        else:
            runs.append((s, t, t + 1))
    plan = None
    if runs:
        active = sum(len(v) for v in per_slot.values())
        lo, hi = min(per_slot), max(per_slot) + 1
        span = hi - lo
        length = max(len(v) for v in per_slot.values())
        # One bmm pair over a range of slots, each padded to the longest segment, or a matmul
        # pair per run (per slot, after one gather, when the runs are scattered). A padded row
        # costs a row of small matmuls, about 1/32 of what one more run costs in calls
        # (measured on CPU), so padding pays while it stays under 32 rows per run it saves:
        # decode steps, and steps that mix decodes with short prefills, batch; a long prefill
        # next to short segments loops. Slots outside lo..hi-1 are never read.
        looped = len(runs) if len(runs) <= 2 * len(per_slot) else len(per_slot)
        padding = span * length - active
        batched = padding <= max(active, _ROWS_PER_RUN * (looped - 1))
        # Direct only if every token of the prefix is live: a rank-0 (released) slot keeps its
        # previous occupant's factors, and in place its tokens' rows would receive them.
        direct = batched and [
            s if s >= 0 and live_slots[s] else -1 for s in slots[: span * length]
        ] == [lo + i // length for i in range(span * length)]
        gather = keep = dest = order = None
        if not batched and len(runs) > 2 * len(per_slot):
            # Slots scattered over many short runs: one gather into slot order, one scatter back.
            ids = [t for s in sorted(per_slot) for t in per_slot[s]]
            order = torch.tensor(ids, dtype=torch.int64, device=groups.device)
            runs, pos = [], 0
            for s in sorted(per_slot):
                runs.append((s, pos, pos + len(per_slot[s])))
                pos += len(per_slot[s])
        if batched and not direct:
            fill = next(iter(per_slot.values()))[0]  # padding rows read a real token; discarded
            g: list[int] = []
            k: list[int] = []
            d: list[int] = []
            for j in range(span):
                toks = per_slot.get(lo + j, [])
                g += toks + [fill] * (length - len(toks))
                k += range(j * length, j * length + len(toks))
                d += toks
            dev = groups.device
            gather = torch.tensor(g, dtype=torch.int64, device=dev)
            keep = torch.tensor(k, dtype=torch.int64, device=dev)
            dest = (
                None if d == list(range(active)) else torch.tensor(d, dtype=torch.int64, device=dev)
            )
        plan = _PackedPlan(
            runs=tuple(runs),
            order=order,
            batched=batched,
            lo=lo,
            span=span,
            length=length,
            direct=direct,
            gather=gather,
            keep=keep,
            dest=dest,
        )
    memo[key] = plan
    return plan


def _accumulate(dst: torch.Tensor, delta: torch.Tensor) -> None:
    """dst += delta, rounding once to dst's dtype when delta is wider."""
    if delta.dtype == dst.dtype:
        dst.add_(delta)
    else:
        dst.copy_(dst.to(delta.dtype) + delta)


def _accumulate_rows(dst: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """dst[rows] += delta, rounding once to dst's dtype when delta is wider."""
    if delta.dtype == dst.dtype:
        dst.index_add_(0, rows, delta)
    else:
        cur = dst.index_select(0, rows).to(delta.dtype)
        cur.add_(delta)
        dst.index_copy_(0, rows, cur.to(dst.dtype))


class PackedStep:
    """One step's packed-LoRA plan (token layout, live slots, scales), shared by every fused layer.

    Built once per step, so that a layer's call is the matmuls and little else: in a 32-token
    decode step the per-call bookkeeping used to cost as much as the matmuls' own launch.
    slot_ranks only say which slots are live (rank > 0) and which released (0): a live slot's
    factors apply at the rank pack_slot wrote, since truncating them would cost a mask per call.
    """

    def __init__(
        self, groups: SlotGroups, scales: torch.Tensor, slot_ranks: torch.Tensor | None
    ) -> None:
        # The values this plan was made for: packed_step makes a new one when they change.
        self.values = _step_values(scales, slot_ranks)
        scale_of, ranks = self.values
        live = (True,) * scales.shape[0] if ranks is None else tuple(r > 0 for r in ranks)
        self.plan = _packed_plan(groups, live)
        self.scales = scales
        self.slot_ranks = slot_ranks
        self._scale_view: torch.Tensor | None = None  # [span, 1, 1] in the work dtype
        self._scale_of = scale_of

    def _batched_scales(self, work: torch.dtype) -> torch.Tensor:
        view = self._scale_view
        if view is None or view.dtype != work:
            plan = self.plan
            assert plan is not None
            view = self.scales[plan.lo : plan.lo + plan.span].to(work).view(plan.span, 1, 1)
            self._scale_view = view
        return view

    def apply(self, y: torch.Tensor, x: torch.Tensor, packed: PackedLora) -> torch.Tensor:
        """Add the packed fused layer's update to y [tokens, out] in place; idle tokens' rows stay untouched."""
        plan = self.plan
        if plan is None:
            return y
        a, rank, work = packed.a, packed.rank, packed.a.dtype
        if x.shape[1] != a.shape[1] or y.shape[1] != packed.out_features:
            raise LoraShapeError(
                f"x {list(x.shape)} and y {list(y.shape)} do not fit packed factors of "
                f"[{a.shape[1]} -> {packed.out_features}]"
            )
        if plan.batched:
            lo, span, length = plan.lo, plan.span, plan.length
            hi, rows = lo + span, span * length
            if plan.direct:
                xp = x[:rows]
            else:
                assert plan.gather is not None
                xp = x.index_select(0, plan.gather)
            if xp.dtype != work:
                xp = xp.to(work)
            h = torch.bmm(xp.view(span, length, -1), a[lo:hi])  # [span, L, P*R]
            h.mul_(self._batched_scales(work))
            slices = packed.slices
            if plan.direct and len(slices) == 1 and y.dtype == work and y.is_contiguous():
                # One slice covering all of y: accumulate inside the matmul.
                y[:rows].view(span, length, -1).baddbmm_(h, slices[0][1][lo:hi])
                return y
            for r0, b, col, width in slices:
                # bmm then add_: measured faster on CPU than baddbmm_ into strided column views of y.
                o = torch.bmm(h[:, :, r0 : r0 + rank], b[lo:hi])  # [span, L, width]
                if plan.direct:
                    _accumulate(y[:rows, col : col + width].view(span, length, width), o)
                    continue
                assert plan.keep is not None
                o = o.view(rows, width).index_select(0, plan.keep)  # [active, width]
                yv = y[:, col : col + width]
                if plan.dest is None:
                    _accumulate(yv[: o.shape[0]], o)
                else:
                    _accumulate_rows(yv, plan.dest, o)
            return y
        scale_of = self._scale_of
        if plan.order is not None:
            xs = x.index_select(0, plan.order).to(work)  # [active, in]
            o = torch.empty(xs.shape[0], packed.out_features, dtype=work, device=x.device)
            for slot, start, end in plan.runs:
                h = torch.mm(xs[start:end], a[slot])  # [n, P*R]
                h.mul_(scale_of[slot])
                for r0, b, col, width in packed.slices:
                    torch.mm(h[:, r0 : r0 + rank], b[slot], out=o[start:end, col : col + width])
            for _, _, col, width in packed.slices:
                _accumulate_rows(y[:, col : col + width], plan.order, o[:, col : col + width])
            return y
        for slot, start, end in plan.runs:
            h = torch.mm(x[start:end].to(work), a[slot])  # [n, P*R]
            h.mul_(scale_of[slot])
            for r0, b, col, width in packed.slices:
                _accumulate(
                    y[start:end, col : col + width], torch.mm(h[:, r0 : r0 + rank], b[slot])
                )
        return y


def packed_step(
    groups: SlotGroups, scales: torch.Tensor, slot_ranks: torch.Tensor | None
) -> PackedStep:
    """The step's PackedStep, built on first use and cached on the SlotGroups for these tensors."""
    hit = groups.memo.get("packed-step")
    if (
        isinstance(hit, PackedStep)
        and hit.scales is scales
        and hit.slot_ranks is slot_ranks
        # The values too: a caller may change scales or ranks in place between calls (a slot
        # released to rank 0 must stop applying). A few host numbers, one per slot.
        and hit.values == _step_values(scales, slot_ranks)
    ):
        return hit
    step = PackedStep(groups, scales, slot_ranks)
    groups.memo["packed-step"] = step
    return step


def _step_values(
    scales: torch.Tensor, slot_ranks: torch.Tensor | None
) -> tuple[list[float], list[int] | None]:
    """Each slot's scale and real rank, on the host."""
    return scales.tolist(), None if slot_ranks is None else slot_ranks.tolist()
