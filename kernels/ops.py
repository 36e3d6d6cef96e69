"""The public multi-LoRA ops: validate once, then hand the work to the torch or Triton backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from .checks import (
    LoraShapeError,
    check_call,
    check_no_overlap,
    check_not_tracked,
    check_rank_values,
    check_rows_disjoint,
    check_scales_dtype,
    check_slots,
    interpreting,
)
from .groups import SlotGroups, group_tokens
from .torch_ops import (
    PackedLora,
    PackedStep,
    add_lora_torch,
    new_packed,
    pack_slot,
    packed_step,
)

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor [{', '.join(str(d) for d in obj.shape)}]"
    return f"a {type(obj).__name__}"


class LoraBackendError(LoraShapeError):
    """The requested backend cannot run on these tensors (e.g. Triton on CPU without the interpreter)."""


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend add_lora uses on device: 'auto' means triton on CUDA and torch elsewhere."""
    if backend not in BACKENDS:
        raise LoraBackendError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not interpreting():
        raise LoraBackendError(
            f"backend='triton' got tensors on {device}; Triton needs CUDA tensors "
            "(or TRITON_INTERPRET=1 to run its interpreter on CPU); use backend='torch'"
        )
    return backend


def add_lora_slices(
    y: torch.Tensor,
    x: torch.Tensor,
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    token_slots: torch.Tensor | SlotGroups,
    scales: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
    backend: Backend = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """add_lora for a fused layer: slice i's update lands in y's columns after slices 0..i-1.

    `validate=False` with SlotGroups skips the argument checks, for a caller that built every
    tensor itself (the engine: ~25 us of checks per call, 128 calls per decode step of an 8B
    model, add up to milliseconds the GPU would wait for). Bad arguments are then undefined.
    """
    groups = token_slots if isinstance(token_slots, SlotGroups) else None
    if groups is not None and not validate:
        return _dispatch(y, x, slices, groups, scales, slot_ranks, backend)
    if groups is None:
        if not isinstance(token_slots, torch.Tensor):
            raise LoraShapeError(
                f"token_slots must be a torch.Tensor or SlotGroups, got {type(token_slots).__name__}; "
                "pass one int32 slot index per token"
            )
        check_slots(token_slots, None, validate_values=False)
        num_tokens, slots_device = int(token_slots.shape[0]), token_slots.device
    else:
        num_tokens, slots_device = groups.num_tokens, groups.device
    shapes = check_call(y, x, slices, scales, slot_ranks, num_tokens, slots_device)
    if groups is None:
        assert isinstance(token_slots, torch.Tensor)
        groups = group_tokens(token_slots, shapes.num_slots)
    elif groups.num_slots != shapes.num_slots:
        raise LoraShapeError(
            f"the SlotGroups were built for {groups.num_slots} slots but lora_a has "
            f"{shapes.num_slots}; call group_tokens(token_slots, {shapes.num_slots})"
        )
    return _dispatch(y, x, slices, groups, scales, slot_ranks, backend)


def _dispatch(
    y: torch.Tensor,
    x: torch.Tensor,
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    groups: SlotGroups,
    scales: torch.Tensor,
    slot_ranks: torch.Tensor | None,
    backend: Backend,
) -> torch.Tensor:
    """Run the checked (or trusted) call on the backend `backend` resolves to."""
    chosen = resolve_backend(backend, x.device)
    if chosen == "triton":
        from . import triton_ops

        if x.device.type != "cuda" and not triton_ops.INTERPRETED:
            # Triton fixes interpreted or compiled when the kernels are defined, at import.
            raise LoraBackendError(
                f"backend='triton' got tensors on {x.device}, but the Triton kernels were compiled "
                "for a GPU: mintvcs.kernels.triton_ops was imported before TRITON_INTERPRET=1 was "
                "set. Set TRITON_INTERPRET=1 before anything imports it, or use backend='torch'"
            )
        return triton_ops.add_lora_triton(y, x, slices, groups, scales, slot_ranks)
    return add_lora_torch(y, x, slices, groups, scales, slot_ranks)


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor | SlotGroups,
    scales: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
    backend: Backend = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """y[t] += scales[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T for s = token_slots[t] >= 0, in place."""
    return add_lora_slices(
        y,
        x,
        [(lora_a, lora_b)],
        token_slots,
        scales,
        slot_ranks=slot_ranks,
        backend=backend,
        validate=validate,
    )


def add_lora_packed(
    y: torch.Tensor,
    x: torch.Tensor,
    packed: PackedLora,
    token_slots: torch.Tensor | SlotGroups,
    scales: torch.Tensor,
    *,
    slot_ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """add_lora_slices for factors packed by pack_slot (torch backend, host-side plan): y += update, in place."""
    # Cheap checks only: this runs once per fused layer per step, and pack_slot built `packed`.
    if not isinstance(packed, PackedLora):
        raise LoraShapeError(
            f"packed must be a PackedLora, got {type(packed).__name__}; build it with new_packed()"
        )
    for name, t in (("y", y), ("x", x), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise LoraShapeError(
                f"{name} must be a torch.Tensor, got {type(t).__name__}"
                + ("; pass torch.tensor(scales, dtype=torch.float32)" if name == "scales" else "")
            )
    num_slots, k, _ = packed.a.shape
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[1] != k:
        raise LoraShapeError(
            f"x {list(x.shape)} and y {list(y.shape)} do not fit packed factors with in_features "
            f"{k}; pass x [tokens, {k}] and y [tokens, {packed.out_features}]"
        )
    if y.shape[1] != packed.out_features or (y.shape[1] > 1 and y.stride(1) != 1):
        raise LoraShapeError(
            f"y has shape {list(y.shape)} and column stride {y.stride(1)}; expected "
            f"[tokens, {packed.out_features}] with contiguous rows"
        )
    check_rows_disjoint(y)
    check_not_tracked(y)
    if not x.is_contiguous():
        raise LoraShapeError(f"x (shape {list(x.shape)}) is not contiguous; call x.contiguous()")
    if y.dtype != x.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise LoraShapeError(
            f"x has dtype {x.dtype} and y {y.dtype}; pass both in the model's dtype"
        )
    if packed.a.dtype not in (x.dtype, torch.float32):
        # The update is added in the factors' dtype: narrower than x, it would round y's rows.
        raise LoraShapeError(
            f"the packed factors have dtype {packed.a.dtype} but x has {x.dtype}; build the "
            "PackedLora with new_packed(dtype=x.dtype) (factors are kept in x's dtype or float32)"
        )
    if scales.shape != (num_slots,):
        raise LoraShapeError(
            f"scales has shape {list(scales.shape)}; expected [{num_slots}] = one scale per slot"
        )
    check_scales_dtype(scales)
    if slot_ranks is not None and not (
        isinstance(slot_ranks, torch.Tensor)
        and slot_ranks.shape == (num_slots,)
        and slot_ranks.dtype in (torch.int32, torch.int64)
    ):
        raise LoraShapeError(
            f"slot_ranks is {_describe(slot_ranks)}; expected an int32 tensor [{num_slots}] "
            "= the real rank of each slot"
        )
    if slot_ranks is not None:
        check_rank_values(slot_ranks, packed.rank, "the packed rank")
    for name, t in (("y", y), ("packed factors", packed.a), ("scales", scales)):
        if t.device != x.device:
            raise LoraShapeError(
                f"{name} is on {t.device} but x is on {x.device}; move every tensor to one device"
            )
    check_no_overlap(y, x, [("the packed factors", t) for t in (packed.a, *packed.b)])
    if isinstance(token_slots, SlotGroups):
        groups = token_slots
        if groups.num_slots != num_slots or groups.num_tokens != x.shape[0]:
            raise LoraShapeError(
                f"the SlotGroups cover {groups.num_tokens} tokens and {groups.num_slots} slots; "
                f"this call has {x.shape[0]} and {num_slots}; call group_tokens(token_slots, {num_slots})"
            )
    else:
        check_slots(token_slots, num_slots, validate_values=True)
        if token_slots.shape[0] != x.shape[0]:
            raise LoraShapeError(
                f"x has {x.shape[0]} tokens but token_slots has {token_slots.shape[0]}; pass one per row"
            )
        groups = group_tokens(token_slots, num_slots)
    step = packed_step(groups, scales, slot_ranks)
    check_packed_ranks(step.values[1], packed.written)
    return step.apply(y, x, packed)


def check_packed_ranks(ranks: list[int] | None, written: list[int]) -> None:
    """Refuse a live slot whose rank is below the rank pack_slot wrote: the packed path cannot truncate."""
    if ranks is None or not written:
        return
    for slot, (rank, packed_rank) in enumerate(zip(ranks, written, strict=True)):
        if 0 < rank < packed_rank:
            raise LoraShapeError(
                f"slot_ranks[{slot}] is {rank} but pack_slot wrote rank-{packed_rank} factors into "
                f"slot {slot}; the packed path applies a live slot's factors at the rank they were "
                f"packed with: pack_slot the first {rank} ranks, or pass {packed_rank} (0 releases it)"
            )


__all__ = [
    "BACKENDS",
    "Backend",
    "LoraBackendError",
    "PackedLora",
    "PackedStep",
    "add_lora",
    "add_lora_packed",
    "add_lora_slices",
    "new_packed",
    "pack_slot",
    "packed_step",
    "resolve_backend",
]
