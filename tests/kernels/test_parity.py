"""add_lora against the reference, for the torch backend and the Triton kernels (interpreted on CPU)."""

from __future__ import annotations

import pytest
import torch

from mintvcs.kernels import (
    add_lora,
    add_lora_reference,
    add_lora_slices,
    group_tokens,
)
from mintvcs.kernels.groups import max_blocks

from .cases import Case, assert_matches, device_for, expected, make_case, same_bits

# Odd K and N so that every tile has a ragged edge; small so that the interpreter stays fast.
K, N = 37, 45
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BACKENDS = ["torch", "triton"]
_GRID: dict[tuple[object, ...], tuple[Case, torch.Tensor]] = {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mix", ["mixed", "none", "same", "runs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rank", [1, 4, 16])
@pytest.mark.parametrize("num_slots", [1, 3, 8])
@pytest.mark.parametrize("tokens", [1, 2, 7, 33, 130])
def test_parity_grid(
    tokens: int, num_slots: int, rank: int, dtype: torch.dtype, mix: str, backend: str
) -> None:
    key = (tokens, num_slots, rank, dtype, mix)
    if key not in _GRID:  # both backends share one case and one (slow) reference result
        case = make_case(
            tokens, num_slots, rank, K, N, dtype, mix, seed=tokens * 100 + num_slots * 10 + rank
        )
        _GRID[key] = (case, expected(case))
    case, want = _GRID[key]
    case = case.to(device_for(backend))
    y = case.y0.clone()
    out = add_lora(
        y, case.x, case.a, case.b, case.slots, case.scales, slot_ranks=case.ranks, backend=backend
    )
    assert out is y, "add_lora must update y in place and return it"
    if mix == "none":
        assert same_bits(y, case.y0)
    assert_matches(case, y, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_full_rank_without_slot_ranks(dtype: torch.dtype, backend: str) -> None:
    case = make_case(
        33, 3, 16, K, N, dtype, "mixed", seed=5, mixed_ranks=False, device=device_for(backend)
    )
    y = add_lora(case.y0.clone(), case.x, case.a, case.b, case.slots, case.scales, backend=backend)
    assert_matches(case, y, expected(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_scales_and_ranks_are_read_as_their_values(backend: str) -> None:
    # Views of other tensors (every second entry, a broadcast): the kernels index flat arrays.
    dev = device_for(backend)
    case = make_case(21, 3, 8, K, N, torch.float32, "mixed", seed=9, device=dev)
    assert case.ranks is not None
    spread_scales = torch.zeros(6, device=dev)
    spread_scales[::2] = case.scales
    spread_ranks = torch.zeros(6, dtype=torch.int32, device=dev)
    spread_ranks[::2] = case.ranks
    y = add_lora(
        case.y0.clone(),
        case.x,
        case.a,
        case.b,
        case.slots,
        spread_scales[::2],
        slot_ranks=spread_ranks[::2],
        backend=backend,
    )
    assert_matches(case, y, expected(case))
    one = torch.tensor([0.7], device=dev)
    broadcast, full = (
        add_lora(
            case.y0.clone(),
            case.x,
            case.a,
            case.b,
            case.slots,
            scales,
            slot_ranks=case.ranks,
            backend=backend,
        )
        for scales in (one.expand(3), one.repeat(3))
    )
    torch.testing.assert_close(broadcast, full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_slices_match_one_call_per_slice(dtype: torch.dtype, backend: str) -> None:
    # q/k/v of a GQA layer: the slices have different widths, one launch covers all three.
    gen = torch.Generator().manual_seed(3)
    tokens, slots, rank, widths = 40, 4, 8, (45, 13, 13)
    dev = device_for(backend)
    case = make_case(tokens, slots, rank, K, sum(widths), dtype, "mixed", seed=3, device=dev)
    ranks = case.ranks
    assert ranks is not None
    pairs = []
    for w in widths:
        a = (torch.randn(slots, rank, K, generator=gen) / K**0.5).to(dev, dtype)
        b = (torch.randn(slots, w, rank, generator=gen) / rank**0.5).to(dev, dtype)
        pairs.append((a, b))
    want = case.y0.clone()
    col = 0
    for a, b in pairs:
        add_lora_reference(
            want[:, col : col + b.shape[1]], case.x, a, b, case.slots, case.scales, ranks
        )
        col += b.shape[1]
    y = case.y0.clone()
    add_lora_slices(y, case.x, pairs, case.slots, case.scales, slot_ranks=ranks, backend=backend)
    assert_matches(case, y, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_groups_reused_across_layers(backend: str) -> None:
    # One SlotGroups per step serves layers of different widths.
    dev = device_for(backend)
    case1 = make_case(33, 8, 16, K, N, torch.float32, "mixed", seed=11, device=dev)
    case2 = make_case(33, 8, 16, 19, 70, torch.float32, "mixed", seed=12, device=dev)
    case2.slots = case1.slots
    groups = group_tokens(case1.slots, 8)
    for case in (case1, case2):
        y = add_lora(
            case.y0.clone(),
            case.x,
            case.a,
            case.b,
            groups,
            case.scales,
            slot_ranks=case.ranks,
            backend=backend,
        )
        assert_matches(case, y, expected(case))


@pytest.mark.parametrize("backend", BACKENDS)
def test_y_may_be_a_column_slice(backend: str) -> None:
    # The engine may hand in a view of a wider output; only its own columns change.
    dev = device_for(backend)
    case = make_case(33, 3, 4, K, N, torch.float32, "mixed", seed=13, device=dev)
    wide = torch.randn(33, N + 20, device=dev)
    before = wide.clone()
    view = wide[:, 10 : 10 + N]
    view.copy_(case.y0)
    add_lora(
        view,
        case.x,
        case.a,
        case.b,
        case.slots,
        case.scales,
        slot_ranks=case.ranks,
        backend=backend,
    )
    assert same_bits(wide[:, :10], before[:, :10])
    assert same_bits(wide[:, 10 + N :], before[:, 10 + N :])
    assert_matches(case, view, expected(case))


@pytest.mark.parametrize("split_k", [2, 3])
def test_triton_split_k(split_k: int) -> None:
    # The GPU picks split-K for small decode batches; check that path here explicitly.
    from mintvcs.kernels.triton_ops import add_lora_triton

    case = make_case(7, 3, 16, 300, N, torch.float32, "mixed", seed=17, device=device_for("triton"))
    y = case.y0.clone()
    add_lora_triton(
        y,
        case.x,
        [(case.a, case.b)],
        group_tokens(case.slots, 3),
        case.scales,
        case.ranks,
        split_k=split_k,
    )
    assert_matches(case, y, expected(case))


@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aligned_factors_are_read_in_whole_vectors_without_their_padding(
    dtype: torch.dtype, split_k: int
) -> None:
    # Shapes on 16 bytes (ALIGNED): the kernels read h and B up to each slot's real rank
    # rounded up to a whole vector, into the NaN padding, and must zero those lanes.
    from mintvcs.kernels.triton_ops import add_lora_triton, vector_aligned

    widths = (32, 16, 16)
    dev = device_for("triton")
    case = make_case(33, 8, 16, 64, sum(widths), dtype, "mixed", seed=23, device=dev)
    assert case.ranks is not None and sorted(set(case.ranks.tolist())) != [16]
    pairs, col = [], 0
    for w in widths:
        pairs.append((case.a.clone(), case.b[:, col : col + w].contiguous()))
        col += w
    assert vector_aligned(pairs, case.x.element_size(), [0, 32, 48], list(widths))
    y = case.y0.clone()
    groups = group_tokens(case.slots, 8)
    add_lora_triton(y, case.x, pairs, groups, case.scales, case.ranks, split_k=split_k)
    want = case.y0.clone()
    col = 0
    for a, b in pairs:
        add_lora_reference(
            want[:, col : col + b.shape[1]], case.x, a, b, case.slots, case.scales, case.ranks
        )
        col += b.shape[1]
    assert_matches(case, y, want)


@pytest.mark.parametrize("tokens", [1, 16, 17, 64, 65, 200, 600])
@pytest.mark.parametrize("num_slots", [1, 5, 64])
def test_group_tokens_blocks_cover_each_token_once(tokens: int, num_slots: int) -> None:
    gen = torch.Generator().manual_seed(tokens + num_slots)
    slots = torch.randint(-1, num_slots, (tokens,), generator=gen, dtype=torch.int32)
    g = group_tokens(slots, num_slots)
    blk = g.blocks()
    assert blk.block_slot.shape[0] == max_blocks(tokens, num_slots, blk.block_m)
    seen: list[int] = []
    for s, start in zip(blk.block_slot.tolist(), blk.block_start.tolist(), strict=True):
        if s < 0:
            continue
        end = min(start + blk.block_m, int(g.slot_end[s]))
        toks = g.sorted_tokens[start:end].tolist()
        assert toks, "a live block must hold tokens"
        assert all(int(slots[t]) == s for t in toks)
        seen += toks
    assert sorted(seen) == sorted(torch.nonzero(slots >= 0).flatten().tolist())
    # The worst case fills the bound exactly: every possible slot busy with one token, the
    # rest on slot 0, so each segment spills one token into an extra block.
    active = min(num_slots, tokens)
    worst = torch.zeros(tokens, dtype=torch.int32)
    worst[:active] = torch.arange(active, dtype=torch.int32)
    bw = group_tokens(worst, num_slots).blocks()
    assert int((bw.block_slot >= 0).sum()) == bw.block_slot.shape[0]


def test_empty_batch() -> None:
    x = torch.empty(0, K)
    y = torch.empty(0, N)
    a, b = torch.zeros(2, 4, K), torch.zeros(2, N, 4)
    out = add_lora(y, x, a, b, torch.empty(0, dtype=torch.int32), torch.ones(2))
    assert out.shape == (0, N)
