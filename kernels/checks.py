"""Host-side validation for the multi-LoRA ops: every bad input fails here, never in a kernel."""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mintvcs.errors import MintError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SLOT_DTYPES = (torch.int32, torch.int64)


class LoraShapeError(MintError):
    """A multi-LoRA op got tensors whose shape, dtype, device or layout it cannot use."""


@dataclass(frozen=True)
class LoraShapes:
    """The sizes of one validated call: tokens, input width, slots, padded rank, slice widths."""

    num_tokens: int
    in_features: int
    num_slots: int
    max_rank: int
    slice_widths: tuple[int, ...]


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    # Read without importing triton: triton fixes the mode when the kernels are decorated.
    # Triton's own reading of the flag: these spellings are on, anything else is off.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_rank_values(slot_ranks: torch.Tensor, rank: int, what: str) -> None:
    """Every real rank in 0..rank (`what` says what `rank` is); read only off a CPU tensor:
    reading values off a GPU would sync every layer, and there the kernels clamp to [0, R]."""
    if slot_ranks.device.type == "cpu" and slot_ranks.numel() > 0:
        lo, hi = int(slot_ranks.min()), int(slot_ranks.max())
        if not (lo >= 0 and hi <= rank):
            raise LoraShapeError(
                f"slot_ranks holds {lo if lo < 0 else hi}; each real rank must be in 0..{rank} "
                f"({what})"
            )


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def slot_count(num_slots: object) -> int:
    """num_slots as an int (an int-like such as a numpy integer is fine); 0 or more."""
    try:
        # operator.index takes True as 1: a bool here is surely a mistake, so it is refused too.
        count = -1 if isinstance(num_slots, bool) else operator.index(num_slots)  # type: ignore[arg-type]
    except TypeError:
        count = -1
    if count < 0:
        kind = "" if num_slots is None or type(num_slots) is int else f" ({_what(num_slots)})"
        raise LoraShapeError(
            f"num_slots is {num_slots!r}{kind}; pass the slot pool's size, an int of 0 or more"
        )
    return count


def check_slots(token_slots: torch.Tensor, num_slots: int | None, *, validate_values: bool) -> None:
    """Check token_slots: 1-D integer, and (optionally, costs a device sync) every value in [-1, S)."""
    if not isinstance(token_slots, torch.Tensor):
        raise LoraShapeError(
            f"token_slots must be a torch.Tensor, got {type(token_slots).__name__}; "
            "pass one int32 slot index per token"
        )
    if token_slots.dtype not in SLOT_DTYPES:
        raise LoraShapeError(
            f"token_slots has dtype {token_slots.dtype}; use torch.int32 (or int64)"
        )
    if token_slots.dim() != 1:
        raise LoraShapeError(
            f"token_slots has shape {_shape(token_slots)}; it must be 1-D [tokens]"
        )
    if num_slots is None:
        return
    if num_slots < 0:
        raise LoraShapeError(f"num_slots is {num_slots}; pass the slot pool's size (0 or more)")
    if validate_values and token_slots.numel() > 0:
        lo, hi = int(token_slots.min()), int(token_slots.max())
        if hi >= 0 and num_slots == 0:
            raise LoraShapeError(
                f"token_slots holds slot index {hi} but the pool has no slots; "
                "use -1 for every token until an adapter is loaded"
            )
        if hi >= num_slots:
            raise LoraShapeError(
                f"token_slots holds slot index {hi} but there are only {num_slots} slots "
                f"(valid: -1..{num_slots - 1}); load the adapter into a slot below {num_slots}"
            )
        if lo < -1:
            raise LoraShapeError(
                f"token_slots holds slot index {lo}; use -1 for 'no adapter' and 0..{num_slots - 1} for a slot"
            )


def check_scales_dtype(scales: torch.Tensor) -> None:
    """Check that scales hold floats the kernels read: float32, float16 or bfloat16."""
    if scales.dtype not in FLOAT_DTYPES:
        raise LoraShapeError(
            f"scales has dtype {scales.dtype}; use float32 (float16 and bfloat16 are accepted "
            "too and read as float32)"
        )


def check_rows_disjoint(y: torch.Tensor) -> None:
    """Check that no two rows of y share memory: each token's update must land in its own row."""
    # With unit column stride, rows overlap exactly when a row starts before the previous one ends
    # (an expand() or as_strided view); the kernels would then add several tokens into one row.
    tokens, width = y.shape
    if tokens > 1 and width > 0 and y.stride(0) < width:
        raise LoraShapeError(
            f"y [{tokens}, {width}] has row stride {y.stride(0)}, so its rows overlap in memory "
            "(an expand() or as_strided view); pass a tensor with one row per token, e.g. y.clone()"
        )


def _rows_meet(y: torch.Tensor, lo: int, hi: int) -> bool:
    """Whether any row of y (unit column stride, rows disjoint) shares a byte with [lo, hi)."""
    tokens, width = y.shape
    if tokens == 0 or width == 0 or hi <= lo:
        return False
    start, row = y.data_ptr(), width * y.element_size()
    if tokens == 1:
        return start < hi and start + row > lo
    step = y.stride(0) * y.element_size()  # >= row: check_rows_disjoint ran first
    # Row t spans [start + t*step, start + t*step + row): it meets [lo, hi) for t in first..last.
    first = max(0, (lo - start - row) // step + 1)
    last = min(tokens - 1, -((start - hi) // step) - 1)
    return first <= last


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes [first, end) that t's elements span (gaps included)."""
    if t.numel() == 0:
        return 0, 0
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def check_no_overlap(
    y: torch.Tensor, x: torch.Tensor, factors: Sequence[tuple[str, torch.Tensor]]
) -> None:
    """Refuse a y that partly overlaps x, or overlaps a factor, in memory; y = x's own rows is fine."""
    # Every backend computes a row's update from x before writing it, so y may be x itself or
    # columns of x's rows. Shifted rows would make the result depend on the backend's order.
    if _rows_meet(y, *_extent(x)):
        # x is contiguous: its rows are in_features long and follow each other.
        offset = y.data_ptr() - x.data_ptr()
        row_bytes = x.shape[1] * x.element_size()
        same_rows = (y.shape[0] <= 1 or y.stride(0) == x.shape[1]) and (
            offset >= 0 and offset + y.shape[1] * y.element_size() <= row_bytes
        )
        if not same_rows:
            raise LoraShapeError(
                "y partly overlaps x in memory (its rows are not x's own rows); pass y = x, "
                "columns of x's rows, or a tensor of its own"
            )
    for name, t in factors:
        if _rows_meet(y, *_extent(t)):
            raise LoraShapeError(
                f"y overlaps {name} in memory; pass a y that shares no memory with the factors"
            )


def check_not_tracked(y: torch.Tensor) -> None:
    """Refuse a y that autograd tracks: the ops write y in place outside autograd (inference only)."""
    # The torch backend would raise torch's own in-place error, Triton would write y untracked.
    if y.requires_grad and torch.is_grad_enabled():
        raise LoraShapeError(
            "y requires grad; the multi-LoRA ops update y in place for inference, outside "
            "autograd: pass y.detach(), or call them under torch.no_grad() or inference_mode()"
        )


def _what(obj: object) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)}"
    return f"a {type(obj).__name__}"


def check_slices(slices: object) -> None:
    """Check that slices is a list or tuple of (lora_a, lora_b) pairs (the tensors are checked later)."""
    if not isinstance(slices, (list, tuple)):
        raise LoraShapeError(
            f"slices is {_what(slices)}; pass a list or tuple of (lora_a, lora_b) pairs "
            "(wrap a generator in list(...))"
        )
    for i, pair in enumerate(slices):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise LoraShapeError(
                f"slice {i} is {_what(pair)}; each slice must be a pair "
                "(lora_a [slots, rank, in_features], lora_b [slots, out_features, rank])"
            )


def check_call(
    y: torch.Tensor,
    x: torch.Tensor,
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    scales: torch.Tensor,
    slot_ranks: torch.Tensor | None,
    num_tokens: int,
    slots_device: torch.device,
) -> LoraShapes:
    """Validate one add_lora / add_lora_slices call and return its sizes."""
    for name, t in (("y", y), ("x", x), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise LoraShapeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_slices(slices)
    if not (len(slices) >= 1):
        raise LoraShapeError("add_lora_slices needs at least one (lora_a, lora_b) slice")
    if x.dtype not in FLOAT_DTYPES:
        raise LoraShapeError(f"x has dtype {x.dtype}; use float32, float16 or bfloat16")
    if y.dtype != x.dtype:
        raise LoraShapeError(
            f"y has dtype {y.dtype} but x has {x.dtype}; pass both in the model's dtype"
        )
    if x.dim() != 2:
        raise LoraShapeError(f"x has shape {_shape(x)}; it must be 2-D [tokens, in_features]")
    if y.dim() != 2:
        raise LoraShapeError(f"y has shape {_shape(y)}; it must be 2-D [tokens, out_features]")
    tokens, k = x.shape
    if tokens != num_tokens:
        raise LoraShapeError(
            f"x has {tokens} tokens but token_slots has {num_tokens}; pass one slot per row of x"
        )
    if not (y.shape[0] == tokens):
        raise LoraShapeError(
            f"y has {y.shape[0]} rows but x has {tokens}; y and x must have one row per token"
        )
    if not x.is_contiguous():
        raise LoraShapeError(f"x (shape {_shape(x)}) is not contiguous; call x.contiguous()")
    if not (y.shape[1] <= 1 or y.stride(1) == 1):
        raise LoraShapeError(
            f"y has column stride {y.stride(1)}; its rows must be contiguous (a column slice of a "
            "contiguous tensor is fine, a transposed one is not)"
        )
    check_rows_disjoint(y)

    check_not_tracked(y)

    a0 = slices[0][0]
    tag0 = "" if len(slices) == 1 else " (slice 0)"
    if not isinstance(a0, torch.Tensor):
        raise LoraShapeError(f"lora_a{tag0} must be a torch.Tensor, got {type(a0).__name__}")
    if a0.dim() != 3:
        raise LoraShapeError(
            f"lora_a{tag0} has shape {_shape(a0)}; it must be 3-D [slots, rank, in_features]"
        )
    num_slots, rank, _ = a0.shape
    widths: list[int] = []
    for i, (a, b) in enumerate(slices):
        tag = "" if len(slices) == 1 else f" (slice {i})"
        for name, t in (("lora_a", a), ("lora_b", b)):
            if not isinstance(t, torch.Tensor):
                raise LoraShapeError(f"{name}{tag} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != x.dtype:
                raise LoraShapeError(
                    f"{name}{tag} has dtype {t.dtype} but x has {x.dtype}; keep the slot pool in the model's dtype"
                )
            if not t.is_contiguous():
                raise LoraShapeError(
                    f"{name}{tag} (shape {_shape(t)}) is not contiguous; call .contiguous() on the slot pool"
                )
        if not (a.dim() == 3 and tuple(a.shape) == (num_slots, rank, k)):
            raise LoraShapeError(
                f"lora_a{tag} has shape {_shape(a)}; expected [{num_slots}, {rank}, {k}] "
                "= [slots, rank, in_features of x]"
            )
        if not (b.dim() == 3 and b.shape[0] == num_slots and b.shape[2] == rank):
            raise LoraShapeError(
                f"lora_b{tag} has shape {_shape(b)}; expected [{num_slots}, out_features, {rank}] "
                "= [slots, out_features, rank of lora_a]"
            )
        widths.append(int(b.shape[1]))
    if not (y.shape[1] == sum(widths)):
        raise LoraShapeError(
            f"y has {y.shape[1]} columns but lora_b gives {sum(widths)} output features "
            f"(slices {widths}); y must be [tokens, sum of slice widths]"
        )
    if not (scales.dim() == 1 and scales.shape[0] == num_slots):
        raise LoraShapeError(
            f"scales has shape {_shape(scales)}; expected [{num_slots}] = one scale per slot"
        )
    check_scales_dtype(scales)
    if slot_ranks is not None:
        if not isinstance(slot_ranks, torch.Tensor):
            raise LoraShapeError(
                f"slot_ranks must be a torch.Tensor, got {type(slot_ranks).__name__}"
            )
        if not (
            slot_ranks.dtype in SLOT_DTYPES
            and slot_ranks.dim() == 1
            and slot_ranks.shape[0] == num_slots
        ):
            raise LoraShapeError(
                f"slot_ranks has shape {_shape(slot_ranks)} and dtype {slot_ranks.dtype}; "
                f"expected int32 [{num_slots}] = the real rank of each slot"
            )
        check_rank_values(slot_ranks, rank, "the padded rank of lora_a")

    named = [("y", y), ("x", x), ("scales", scales)]
    for i, (a, b) in enumerate(slices):
        named += [(f"lora_a[{i}]", a), (f"lora_b[{i}]", b)]
    if slot_ranks is not None:
        named.append(("slot_ranks", slot_ranks))
    for name, t in named:
        if t.device != x.device:
            raise LoraShapeError(
                f"{name} is on {t.device} but x is on {x.device}; move every tensor to one device"
            )
    if slots_device != x.device:
        raise LoraShapeError(
            f"token_slots is on {slots_device} but x is on {x.device}; move every tensor to one device"
        )
    check_no_overlap(y, x, named[2:])
    return LoraShapes(tokens, k, num_slots, rank, tuple(widths))
