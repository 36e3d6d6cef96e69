"""group_tokens without validation (the engine's path), and a pool with no slots at all."""

from __future__ import annotations

import pytest
import torch

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
