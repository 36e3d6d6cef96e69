"""The packed CPU path (A factors of a fused layer side by side) against add_lora_slices."""

from __future__ import annotations

import pytest
import torch

from mintvcs.kernels import add_lora_packed, add_lora_slices, group_tokens, new_packed, pack_slot

SLOTS, RANK, IN = 6, 8, 24
WIDTHS = (16, 8, 8)  # a fused q/k/v-like layer
COLUMNS = [(0, 16), (16, 8), (24, 8)]
UNTARGETED = (2, 1)  # slot 2 does not adapt slice 1


def _token_slots(mode: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Slot mixes that reach every plan: random with idle tokens, sorted, even runs, two slots."""
    if mode == 0:
        slots = torch.randint(-1, SLOTS, (tokens,), generator=gen)
    elif mode == 1:
        slots = torch.sort(torch.randint(-1, SLOTS, (tokens,), generator=gen)).values
    elif mode == 2:
        slots = (torch.arange(tokens) // max(1, tokens // SLOTS)).clamp(max=SLOTS - 1)
    else:
        slots = torch.randint(0, 2, (tokens,), generator=gen) * 3
    return slots.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(24))
def test_packed_matches_slices(dtype: torch.dtype, case: int) -> None:
    gen = torch.Generator().manual_seed(case)
    tokens = int(torch.randint(1, 80, (1,), generator=gen))
    token_slots = _token_slots(case % 4, tokens, gen)
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
