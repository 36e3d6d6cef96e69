"""group_tokens without validation (the engine's path), and a pool with no slots at all."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mintvcs.kernels import (
    LoraShapeError,
    add_lora,
    add_lora_packed,
    group_tokens,
    new_packed,
    pack_slot,
)

from .cases import device_for, same_bits

S, R, K, N = 3, 4, 16, 8
BACKENDS = ["torch", "triton"]


def _inputs(tokens: int, num_slots: int, device: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(tokens * 10 + num_slots)
    y0 = torch.randn(tokens, N, generator=gen)
    y0[:, ::2] = -0.0  # an add of 0.0 would flip these bits
    x = torch.randn(tokens, K, generator=gen)
    a = torch.randn(num_slots, R, K, generator=gen)
    b = torch.randn(num_slots, N, R, generator=gen)
    scales = torch.rand(num_slots, generator=gen) + 0.5
    return tuple(t.to(device) for t in (y0, x, a, b, scales))


# Every index outside 0..S-1; 2**32 would wrap to slot 0 if narrowed to int32 before the check.
OUT_OF_RANGE = [S, S + 5, -2, -7, 2**32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_out_of_range_index_is_idle(backend: str) -> None:
    dev = device_for(backend)
    raw = torch.tensor([0, *OUT_OF_RANGE, 2, -1, 1, 0], dtype=torch.int64, device=dev)
    clean = torch.where((raw >= 0) & (raw < S), raw, -1).to(torch.int32)
    groups = group_tokens(raw, S, validate=False)
    assert groups.token_slots.tolist() == clean.tolist()
    assert groups.counts.tolist() == [2, 1, 1]
    assert groups.sorted_tokens[:4].tolist() == [0, 9, 8, 6]
    y0, x, a, b, scales = _inputs(raw.shape[0], S, dev)
    got = add_lora(y0.clone(), x, a, b, groups, scales, backend=backend)
    want = add_lora(y0.clone(), x, a, b, clean, scales, backend=backend)
    assert same_bits(got, want)
    idle = clean < 0
    assert same_bits(got[idle], y0[idle]), "an out-of-range index must leave its row untouched"


def test_unvalidated_out_of_range_index_is_idle_packed() -> None:
    raw = torch.tensor([0, *OUT_OF_RANGE, 2, 1, 1], dtype=torch.int64)
    clean = torch.where((raw >= 0) & (raw < S), raw, -1).to(torch.int32)
    y0, x, a, b, scales = _inputs(raw.shape[0], S, "cpu")
    packed = new_packed(S, K, N, [(0, N)], R, dtype=torch.float32, device=torch.device("cpu"))
    for slot in range(S):
        pack_slot(packed, slot, [(a[slot], b[slot])])
    got = add_lora_packed(y0.clone(), x, packed, group_tokens(raw, S, validate=False), scales)
    want = add_lora(y0.clone(), x, a, b, clean, scales, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert same_bits(got[clean < 0], y0[clean < 0])


@pytest.mark.parametrize("bad", OUT_OF_RANGE)
def test_validated_out_of_range_index_is_an_error(bad: int) -> None:
    with pytest.raises(LoraShapeError, match=f"slot index {bad}"):
        group_tokens(torch.tensor([0, bad, -1], dtype=torch.int64), S)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_slots_is_a_no_op(backend: str) -> None:
    # Before any adapter is loaded the pool may be empty: every token is -1 and nothing changes.
    dev = device_for(backend)
    slots = torch.full((7,), -1, dtype=torch.int32, device=dev)
    y0, x, a, b, scales = _inputs(7, 0, dev)
    for token_slots in (slots, group_tokens(slots, 0), group_tokens(slots, 0, validate=False)):
        got = add_lora(y0.clone(), x, a, b, token_slots, scales, backend=backend)
        assert same_bits(got, y0)


def test_no_slots_is_a_no_op_packed() -> None:
    slots = torch.full((7,), -1, dtype=torch.int32)
    y0, x, *_ = _inputs(7, 0, "cpu")
    packed = new_packed(0, K, N, [(0, N)], R, dtype=torch.float32, device=torch.device("cpu"))
    got = add_lora_packed(y0.clone(), x, packed, slots, torch.ones(0))
    assert same_bits(got, y0)


def test_no_slots_with_a_slot_index_is_an_error() -> None:
    with pytest.raises(LoraShapeError, match="slot index 0 but the pool has no slots"):
        group_tokens(torch.tensor([-1, 0], dtype=torch.int32), 0)
    # Unvalidated, an index into an empty pool is idle like any other out-of-range index.
    groups = group_tokens(torch.tensor([-1, 0], dtype=torch.int32), 0, validate=False)
    assert groups.token_slots.tolist() == [-1, -1] and groups.segments() == ()
    assert groups.blocks().block_slot.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_scales_are_read_as_float32(dtype: torch.dtype, backend: str) -> None:
    # The documented scale dtypes: float32, float16 and bfloat16 (these values are exact in all).
    dev = device_for(backend)
    slots = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=dev)
    y0, x, a, b, _ = _inputs(5, S, dev)
    scales = torch.tensor([0.5, 2.0, 1.25], device=dev)
    want = add_lora(y0.clone(), x, a, b, slots, scales, backend=backend)
    got = add_lora(y0.clone(), x, a, b, slots, scales.to(dtype), backend=backend)
    assert same_bits(got, want)


class _HostReads(TorchFunctionMode):
    """Counts reads of tensor values into Python (each one a device sync on a GPU)."""

    READS = frozenset({"tolist", "item", "__int__", "__float__", "__bool__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [6, 120], ids=["padded", "loop"])
def test_torch_backend_reads_the_host_once_per_step(tokens: int) -> None:
    # group_tokens keeps no host segments off the CPU; this SlotGroups is the one it builds on a
    # GPU, so the torch backend's host reads are those it would make there, each a sync.
    slots = (torch.arange(tokens) * S // tokens).to(torch.int32)  # 2 or 40 tokens per slot
    groups = dataclasses.replace(group_tokens(slots, S), host_segments=None, memo={})
    y0, x, a, b, scales = _inputs(tokens, S, "cpu")
    ranks = torch.tensor([R, 2, R], dtype=torch.int32)

    def layer() -> torch.Tensor:
        return add_lora(
            y0.clone(), x, a, b, groups, scales, slot_ranks=ranks, backend="torch", validate=False
        )

    with _HostReads() as first:
        want = layer()
    with _HostReads() as later:
        for _ in range(4):
            assert same_bits(layer(), want)
    assert first.count > 0 and later.count == 0
    # In-place writes between calls are seen: a slot released to rank 0, a new scale.
    ranks[1] = 0
    scales[0] *= 3
    got = layer()
    one = slots == 1
    assert same_bits(got[one], y0[one])
    zero = slots == 0
    torch.testing.assert_close(got[zero] - y0[zero], 3 * (want[zero] - y0[zero]))


def test_torch_backend_reads_inference_tensors_every_call() -> None:
    # Inference-mode tensors keep no version counter, so their values cannot be cached safely.
    slots = torch.tensor([0, 1, 2, 1], dtype=torch.int32)
    groups = group_tokens(slots, S)
    y0, x, a, b, scales = _inputs(4, S, "cpu")
    with torch.inference_mode():
        ranks = torch.full((S,), R, dtype=torch.int32)
        add_lora(y0.clone(), x, a, b, groups, scales, slot_ranks=ranks, backend="torch")
        ranks[1] = 0
        got = add_lora(y0.clone(), x, a, b, groups, scales, slot_ranks=ranks, backend="torch")
    assert same_bits(got[slots == 1], y0[slots == 1])
