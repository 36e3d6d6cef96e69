"""The compiled Triton kernels on a GPU: large shapes, and capture in a CUDA graph. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from mintvcs.kernels import add_lora, group_tokens
from mintvcs.kernels.torch_ops import add_lora_torch

from .cases import TOL, Case, assert_matches, expected, make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        reason="TRITON_INTERPRET is set; unset it to run the compiled kernels",
    ),
]


def exact(case: Case) -> torch.Tensor:
    """The op in float64 on the GPU (the torch backend, itself checked against the reference)."""
    y = case.y0.double()
    a, b = case.a.double(), case.b.double()
    add_lora_torch(
        y, case.x.double(), [(a, b)], group_tokens(case.slots, a.shape[0]), case.scales, case.ranks
    )
    return y.to(case.y0.dtype)


@pytest.mark.parametrize("mix", ["mixed", "none", "same", "runs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rank", [16, 64])
@pytest.mark.parametrize("num_slots", [1, 8, 64])
@pytest.mark.parametrize("tokens", [1, 7, 33, 256, 2048])
def test_large_grid(tokens: int, num_slots: int, rank: int, dtype: torch.dtype, mix: str) -> None:
    case = make_case(
        tokens,
        num_slots,
        rank,
        4099,
        2053,
        dtype,
        mix,
        seed=tokens + num_slots + rank,
        device="cuda",
    )
    y = case.y0.clone()
    add_lora(
        y, case.x, case.a, case.b, case.slots, case.scales, slot_ranks=case.ranks, backend="triton"
    )
    assert_matches(case, y, exact(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_against_reference_loop(dtype: torch.dtype) -> None:
    case = make_case(130, 8, 16, 4096, 4096, dtype, "mixed", seed=1, device="cuda")
    y = add_lora(
        case.y0.clone(), case.x, case.a, case.b, case.slots, case.scales, slot_ranks=case.ranks
    )
    assert_matches(case, y, expected(case))


def test_cuda_graph_replays_with_new_slots() -> None:
    # The grid depends on (tokens, slots, shapes) only, so one capture serves every slot mix.
    case = make_case(64, 8, 16, 1024, 1024, torch.float16, "mixed", seed=2, device="cuda")
    slots = case.slots.clone()
    y = case.y0.clone()

    def step() -> None:
        groups = group_tokens(slots, 8, validate=False)
        add_lora(
            y, case.x, case.a, case.b, groups, case.scales, slot_ranks=case.ranks, backend="triton"
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm up: compile and fill the address caches outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        # Unvalidated indices outside -1..7 must count as idle (no device-side assert).
        new = torch.randint(-3, 11, (64,), generator=gen, dtype=torch.int32)
        slots.copy_(new)
        y.copy_(case.y0)
        graph.replay()
        torch.cuda.synchronize()
        idle = torch.where((new >= 0) & (new < 8), new, -1)
        fresh = Case(case.y0, case.x, case.a, case.b, idle.cuda(), case.scales, case.ranks)
        rtol, atol = TOL[torch.float16]
        torch.testing.assert_close(y.double(), exact(fresh).double(), rtol=rtol, atol=atol)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_tensors_device() -> None:
    # The current device stays cuda:0: the kernels must still run on cuda:1, where the tensors are.
    case = make_case(33, 8, 16, 256, 128, torch.float16, "mixed", seed=3, device="cuda:1")
    assert torch.cuda.current_device() == 0
    y = add_lora(
        case.y0.clone(),
        case.x,
        case.a,
        case.b,
        case.slots,
        case.scales,
        slot_ranks=case.ranks,
        backend="triton",
    )
    assert_matches(case, y, expected(case))
