"""validate=False: the engine's trusted call skips the checks and computes the same bits."""

from __future__ import annotations

import pytest
import torch

from mintvcs.kernels import LoraShapeError, add_lora, add_lora_slices, group_tokens

from .cases import device_for, same_bits

S, R, K = 3, 4, 24
WIDTHS = (16, 8, 8)  # a fused q/k/v


def _call(backend: str, validate: bool, grouped: bool) -> torch.Tensor:
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, K, generator=gen).to(dev)
    y = torch.randn(9, sum(WIDTHS), generator=gen).to(dev)
    slices = [
        (torch.randn(S, R, K, generator=gen).to(dev), torch.randn(S, n, R, generator=gen).to(dev))
        for n in WIDTHS
    ]
    scales = (torch.rand(S, generator=gen) + 0.5).to(dev)
    ranks = torch.tensor([4, 2, 0], dtype=torch.int32, device=dev)
    slots = torch.tensor([0, 0, 1, -1, 2, 1, 0, -1, 1], dtype=torch.int32, device=dev)
    token_slots = group_tokens(slots, S, validate=False) if grouped else slots
    return add_lora_slices(
        y, x, slices, token_slots, scales, slot_ranks=ranks, backend=backend, validate=validate
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unchecked_call_gives_the_checked_bits(backend: str) -> None:
    checked = _call(backend, validate=True, grouped=True)
    assert same_bits(_call(backend, validate=False, grouped=True), checked)
    assert same_bits(_call(backend, validate=True, grouped=False), checked)


def test_raw_token_slots_are_always_checked() -> None:
    # Only pre-grouped tokens (a caller that ran group_tokens) may skip the checks.
    y, x = torch.zeros(2, 8), torch.zeros(2, K)
    a, b = torch.zeros(S, R, K), torch.zeros(S, 8, R)
    with pytest.raises(LoraShapeError, match="slot index 5"):
        add_lora(y, x, a, b, torch.tensor([5, 0], dtype=torch.int32), torch.ones(S), validate=False)
