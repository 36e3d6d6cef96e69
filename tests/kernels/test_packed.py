"""The packed CPU path (A factors of a fused layer side by side) against add_lora_slices."""

from __future__ import annotations

import pytest
import torch

from mintvcs.kernels import add_lora_packed, add_lora_slices, group_tokens, new_packed, pack_slot
from mintvcs.kernels.torch_ops import _packed_plan

SLOTS, RANK, IN = 6, 8, 24
WIDTHS = (16, 8, 8)  # a fused q/k/v-like layer
COLUMNS = [(0, 16), (16, 8), (24, 8)]
UNTARGETED = (2, 1)  # slot 2 does not adapt slice 1


def _token_slots(mode: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Slot mixes that reach every plan (see test_plan_layouts for which takes which)."""
    if mode == 0:  # random, with idle tokens
        slots = torch.randint(-1, SLOTS, (tokens,), generator=gen)
    elif mode == 1:  # sorted
        slots = torch.sort(torch.randint(-1, SLOTS, (tokens,), generator=gen)).values
    elif mode == 2:  # even runs
        slots = (torch.arange(tokens) // max(1, tokens // SLOTS)).clamp(max=SLOTS - 1)
    elif mode == 3:  # two slots
        slots = torch.randint(0, 2, (tokens,), generator=gen) * 3
    elif mode == 4:  # a long prefill beside one-token decodes
        slots = torch.cat([torch.arange(1, SLOTS), torch.zeros(tokens, dtype=torch.long)])
    else:  # two long segments, each split into scattered runs
        third = tokens // 3
        slots = torch.cat([torch.zeros(third), torch.full((3,), 5), torch.zeros(third)])
        slots = torch.cat([slots, torch.full((2,), 5), torch.zeros(third)])
    return slots.to(torch.int32)


def test_plan_layouts() -> None:
    """Decodes and short prefills run as one padded bmm pair; a long segment beside short ones loops."""
    cases = {
        "decode": ([s for s in range(SLOTS) for _ in range(4)], (True, True)),
        "decodes + short prefills": ([0, 1, 2, 3, 4, 5] + [2] * 16 + [4] * 16, (True, False)),
        "long prefill + decodes": ([1, 2, 3, 4, 5] + [0] * 200, (False, False)),
    }
    for name, (slots, (batched, direct)) in cases.items():
        groups = group_tokens(torch.tensor(slots, dtype=torch.int32), SLOTS)
        plan = _packed_plan(groups, (True,) * SLOTS)
        assert plan is not None
        assert (plan.batched, plan.direct, plan.order is None) == (batched, direct, True), name
    # Scattered runs of two distant slots: one gather into slot order, not a 30x padded bmm.
    for slots in (_token_slots(5, 200, torch.Generator()), torch.tensor([0, 5] * 100)):
        groups = group_tokens(slots.to(torch.int32), SLOTS)
        plan = _packed_plan(groups, (True,) * SLOTS)
        assert plan is not None and not plan.batched and plan.order is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(30))
def test_packed_matches_slices(dtype: torch.dtype, case: int) -> None:
    gen = torch.Generator().manual_seed(case)
    mode = case % 6
    tokens = int(torch.randint(1, 80, (1,), generator=gen)) + (120 if mode >= 4 else 0)
    token_slots = _token_slots(mode, tokens, gen)
    tokens = token_slots.shape[0]
    ranks = torch.randint(0, RANK + 1, (SLOTS,), generator=gen).to(torch.int32)
    slices = [
        (
            torch.randn(SLOTS, RANK, IN, generator=gen).to(dtype),
            torch.randn(SLOTS, width, RANK, generator=gen).to(dtype),
        )
        for width in WIDTHS
    ]
    packed = new_packed(
        SLOTS, IN, sum(WIDTHS), COLUMNS, RANK, dtype=dtype, device=torch.device("cpu")
    )
    for slot in range(SLOTS):
        rank = int(ranks[slot])
        factors = []
        for index, (a, b) in enumerate(slices):
            if (slot, index) == UNTARGETED:
                b[slot] = 0
                factors.append(None)
            else:
                b[slot, :, rank:] = 0
                factors.append((a[slot, :rank], b[slot, :, :rank]))
        pack_slot(packed, slot, factors)
    x = torch.randn(tokens, IN, generator=gen).to(dtype)
    y0 = torch.randn(tokens, sum(WIDTHS), generator=gen).to(dtype)
    scales = torch.rand(SLOTS, generator=gen) * 2
    want = add_lora_slices(
        y0.clone(), x, slices, token_slots, scales, slot_ranks=ranks, backend="torch"
    )
    got = add_lora_packed(
        y0.clone(), x, packed, group_tokens(token_slots, SLOTS), scales, slot_ranks=ranks
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (want.float() - got.float()).abs().max().item() <= tol * max(
        1.0, want.abs().max().item()
    )
    idle = (token_slots < 0) | (ranks[token_slots.clamp(min=0).long()] == 0)
    assert torch.equal(got[idle], y0[idle]), "rows of idle tokens must stay bit-identical"
