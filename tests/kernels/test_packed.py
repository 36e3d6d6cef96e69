"""The packed CPU path (A factors of a fused layer side by side) against add_lora_slices."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from mintvcs.kernels import (
    LoraShapeError,
    PackedLora,
    add_lora_packed,
    add_lora_slices,
    group_tokens,
    new_packed,
    pack_slot,
)
from mintvcs.kernels.torch_ops import _accumulate, _accumulate_rows, _packed_plan

from .cases import same_bits

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
            elif rank == 0:
                # A released slot: rank 0, but its previous occupant's factors stay in place.
                factors.append((a[slot], b[slot]))
            else:
                b[slot, :, rank:] = 0
                factors.append((a[slot, :rank], b[slot, :, :rank]))
        pack_slot(packed, slot, factors)
    x = torch.randn(tokens, IN, generator=gen).to(dtype)
    y0 = torch.randn(tokens, sum(WIDTHS), generator=gen).to(dtype)
    y0[::2, ::3] = -0.0  # y + 0.0 would turn these into 0.0: untouched rows must keep them
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
    assert same_bits(got[idle], y0[idle]), "rows of idle and rank-0 tokens must stay bit-identical"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("widths", [(16,), WIDTHS], ids=["one slice", "q/k/v"])
@pytest.mark.parametrize(
    "slots",
    [
        [0, 0, 1, 1, 2, 2],  # already in slot order (no gather), the rank-0 slot in the middle
        [1, 1, 0, 0, 2, 2],  # ... first
        [0, 0, 2, 2, 1, 1],  # ... last
        [0, 1, 0, 1, 2, 2],  # gathered into slot order
        [1, 1, 1, -1],  # only the rank-0 slot and an idle token
        [0] * 40 + [1, 1, 2],  # a long segment: one matmul pair per run
    ],
    ids=["in order", "first", "last", "gathered", "only rank 0", "runs"],
)
def test_rank0_slot_never_reads_stale_factors(
    slots: list[int], widths: tuple[int, ...], dtype: torch.dtype
) -> None:
    # SlotPools.release() only sets a slot's rank to 0: its old factors stay, non-zero.
    gen = torch.Generator().manual_seed(len(slots))
    ranks = torch.tensor([RANK, 0, 3], dtype=torch.int32)
    columns, col = [], 0
    for width in widths:
        columns.append((col, width))
        col += width
    packed = new_packed(3, IN, col, columns, RANK, dtype=dtype, device=torch.device("cpu"))
    slices = [
        (
            torch.randn(3, RANK, IN, generator=gen).to(dtype),
            torch.randn(3, width, RANK, generator=gen).to(dtype),
        )
        for width in widths
    ]
    for slot in range(3):
        r = RANK if slot == 1 else int(ranks[slot])  # slot 1 keeps stale full-rank factors
        for _, b in slices:
            b[slot, :, r:] = 0
        pack_slot(packed, slot, [(a[slot, :r], b[slot, :, :r]) for a, b in slices])
    token_slots = torch.tensor(slots, dtype=torch.int32)
    x = torch.randn(len(slots), IN, generator=gen).to(dtype)
    y0 = torch.randn(len(slots), col, generator=gen).to(dtype)
    y0[token_slots == 1] = -0.0  # adding even 0.0 would flip these to +0.0
    scales = torch.tensor([0.5, 2.0, 1.5])
    got = add_lora_packed(y0.clone(), x, packed, token_slots, scales, slot_ranks=ranks)
    idle = (token_slots < 0) | (token_slots == 1)
    assert same_bits(got[idle], y0[idle]), "a rank-0 slot's tokens read its stale factors"
    want = add_lora_slices(
        y0.clone(), x, slices, token_slots, scales, slot_ranks=ranks, backend="torch"
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def _filled_pool() -> PackedLora:
    gen = torch.Generator().manual_seed(0)
    packed = new_packed(
        SLOTS, IN, sum(WIDTHS), COLUMNS, RANK, dtype=torch.float32, device=torch.device("cpu")
    )
    for slot in range(SLOTS):
        pack_slot(
            packed,
            slot,
            [
                (torch.randn(RANK, IN, generator=gen), torch.randn(w, RANK, generator=gen))
                for w in WIDTHS
            ],
        )
    return packed


def _good_factors(rank: int = RANK) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    return [(torch.ones(rank, IN), torch.ones(w, rank)) for w in WIDTHS]


BAD_PACK: list[tuple[str, Callable[[], tuple[object, object]], str]] = [
    ("slot -1", lambda: (-1, _good_factors()), "slot is -1; pass an int in 0..5"),
    ("slot == S", lambda: (SLOTS, _good_factors()), "slot is 6"),
    ("slot not an int", lambda: ("1", _good_factors()), "slot is '1'"),
    (
        "too few factors",
        lambda: (1, _good_factors()[:2]),
        "factors has 2 entries; pass a list of 3",
    ),
    (
        "factors a generator",
        lambda: (1, iter(_good_factors())),
        "factors is a list_iterator; pass a list of 3",
    ),
    (
        "rank > R",
        lambda: (1, [*_good_factors()[:2], _good_factors(RANK + 2)[2]]),
        "with rank at most 8",
    ),
    (
        "wrong in_features",
        lambda: (1, [(torch.ones(RANK, IN - 1), torch.ones(16, RANK)), None, None]),
        f"factors[0] A has shape [{RANK}, {IN - 1}]; expected [rank, {IN}]",
    ),
    (
        "B width",
        lambda: (1, [None, (torch.ones(2, IN), torch.ones(16, 2)), None]),
        "factors[1] B has shape [16, 2]; expected [8, 2]",
    ),
    (
        "B rank differs from A",
        lambda: (1, [None, None, (torch.ones(2, IN), torch.ones(8, 3))]),
        "expected [8, 2]",
    ),
    ("not a pair", lambda: (1, [torch.ones(RANK, IN), None, None]), "factors[0] is a Tensor"),
    (
        "integer factors",
        lambda: (1, [(torch.ones(2, IN, dtype=torch.int32), torch.ones(16, 2)), None, None]),
        "factors[0] A has dtype torch.int32",
    ),
]


@pytest.mark.parametrize(("name", "make", "needle"), BAD_PACK, ids=[b[0] for b in BAD_PACK])
def test_pack_slot_refuses_bad_input_before_writing(
    name: str, make: Callable[[], tuple[object, object]], needle: str
) -> None:
    packed = _filled_pool()
    before = [t.clone() for t in (packed.a, *packed.b)]
    slot, factors = make()
    with pytest.raises(LoraShapeError) as err:
        pack_slot(packed, slot, factors)  # type: ignore[arg-type]
    assert needle in str(err.value), f"{name}: {err.value}"
    for was, now in zip(before, (packed.a, *packed.b), strict=True):
        assert same_bits(was, now), f"{name}: pack_slot wrote part of the slot before failing"


def _packed_call(**override: object) -> torch.Tensor:
    packed = _filled_pool()
    args: dict[str, object] = {
        "y": torch.zeros(4, sum(WIDTHS)),
        "x": torch.randn(4, IN),
        "packed": packed,
        "token_slots": torch.tensor([0, 1, 1, 2], dtype=torch.int32),
        "scales": torch.ones(SLOTS),
        "slot_ranks": None,
    }
    args.update(override)
    ranks = args.pop("slot_ranks")
    return add_lora_packed(**args, slot_ranks=ranks)  # type: ignore[arg-type]


def _half_pool() -> PackedLora:
    """Factors in float16, as new_packed(dtype=torch.float16) keeps them on a GPU."""
    pool = _filled_pool()
    return dataclasses.replace(pool, a=pool.a.half(), b=tuple(b.half() for b in pool.b))


def _shifted_x_y() -> dict[str, object]:
    """x [4, IN] and y [4, out] in one buffer, y starting 10 elements into x's first row."""
    buf = torch.randn(200)
    return {"x": buf[: 4 * IN].view(4, IN), "y": buf[10 : 10 + 4 * sum(WIDTHS)].view(4, -1)}


BAD_PACKED_CALL: list[tuple[str, Callable[[], dict[str, object]], str]] = [
    ("scales a list", lambda: {"scales": [1.0] * SLOTS}, "scales must be a torch.Tensor, got list"),
    ("scales float64", lambda: {"scales": torch.ones(SLOTS, dtype=torch.float64)}, "use float32"),
    ("scales int", lambda: {"scales": torch.ones(SLOTS, dtype=torch.int64)}, "dtype torch.int64"),
    ("scales length", lambda: {"scales": torch.ones(SLOTS + 1)}, "expected [6]"),
    ("slot_ranks a list", lambda: {"slot_ranks": [1] * SLOTS}, "slot_ranks is a list"),
    (
        "slot_ranks float",
        lambda: {"slot_ranks": torch.ones(SLOTS)},
        "slot_ranks is a torch.float32 tensor [6]",
    ),
    ("packed not packed", lambda: {"packed": torch.ones(3)}, "packed must be a PackedLora"),
    (
        "factors narrower than x",
        lambda: {"packed": _half_pool()},
        "the packed factors have dtype torch.float16 but x has torch.float32",
    ),
    (
        "y requires grad",
        lambda: {"y": torch.zeros(4, sum(WIDTHS), requires_grad=True)},
        "y requires grad",
    ),
    ("y partly overlaps x", _shifted_x_y, "y partly overlaps x in memory"),
    (
        "y overlaps the factors",
        lambda: (lambda p: {"packed": p, "y": p.a.view(-1)[: 4 * sum(WIDTHS)].view(4, -1)})(
            _filled_pool()
        ),
        "y overlaps the packed factors",
    ),
    ("x a list", lambda: {"x": [[0.0] * IN] * 4}, "x must be a torch.Tensor"),
    (
        "y rows overlap",
        lambda: {"y": torch.zeros(1, sum(WIDTHS)).expand(4, sum(WIDTHS))},
        "rows overlap in memory",
    ),
    ("slot out of range", lambda: {"token_slots": torch.tensor([0, 6, 1, 2])}, "slot index 6"),
    (
        "rank below 0",
        lambda: {"slot_ranks": torch.tensor([8, -3, 8, 8, 8, 8], dtype=torch.int32)},
        "slot_ranks holds -3",
    ),
    (
        "rank below the rank packed",
        lambda: {"slot_ranks": torch.tensor([8, 3, 8, 8, 0, 8], dtype=torch.int32)},
        "slot_ranks[1] is 3 but pack_slot wrote rank-8 factors into slot 1",
    ),
    (
        "rank past the packed rank",
        lambda: {"slot_ranks": torch.tensor([8, 99, 8, 8, 8, 8], dtype=torch.int32)},
        "slot_ranks holds 99",
    ),
]


@pytest.mark.parametrize(
    ("name", "make", "needle"), BAD_PACKED_CALL, ids=[b[0] for b in BAD_PACKED_CALL]
)
def test_add_lora_packed_bad_input(
    name: str, make: Callable[[], dict[str, object]], needle: str
) -> None:
    with pytest.raises(LoraShapeError) as err:
        _packed_call(**make())
    assert needle in str(err.value), f"{name}: {err.value}"


def test_values_changed_in_place_are_read_on_the_next_call() -> None:
    # One SlotGroups reused while a caller updates scales and ranks in place (a slot released
    # to rank 0, a new scale): the cached plan must follow the values, not the tensors' identity.
    packed = _filled_pool()
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(1))
    groups = group_tokens(torch.tensor([0, 1, 1, 2], dtype=torch.int32), SLOTS)
    scales = torch.ones(SLOTS)
    ranks = torch.full((SLOTS,), RANK, dtype=torch.int32)

    def run() -> torch.Tensor:
        return add_lora_packed(
            torch.zeros(4, sum(WIDTHS)), x, packed, groups, scales, slot_ranks=ranks
        )

    first = run()
    ranks[1] = 0  # released
    scales[0] = 3.0
    second = run()
    assert same_bits(second[1:3], torch.zeros(2, sum(WIDTHS)))  # slot 1 applies nothing now
    torch.testing.assert_close(second[0], 3 * first[0])
    torch.testing.assert_close(second[3], first[3])


@pytest.mark.parametrize(
    ("columns", "rank"),
    [([(0, 16), (16, 8), (24, 16)], RANK), ([(0, 16), (8, 8), (24, 8)], RANK), (COLUMNS, -1)],
    ids=["past out_features", "overlapping", "negative rank"],
)
def test_new_packed_refuses_what_cannot_be_a_fused_layer(
    columns: list[tuple[int, int]], rank: int
) -> None:
    with pytest.raises(LoraShapeError, match=r"columns|rank"):
        new_packed(
            SLOTS, IN, sum(WIDTHS), columns, rank, dtype=torch.float32, device=torch.device("cpu")
        )


def test_a_wider_delta_is_added_with_one_rounding() -> None:
    """bf16 y += fp32 delta rounds once, as (y.float() + delta).to(bf16), whole or by rows."""
    g = torch.Generator().manual_seed(3)
    y = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    delta = torch.randn(64, 128, generator=g) * 3e-2
    want = (y.float() + delta).to(torch.bfloat16)
    # Rounding the delta first gives other bits somewhere: the check below can tell them apart.
    assert not torch.equal(y + delta.to(torch.bfloat16), want)
    whole = y.clone()
    _accumulate(whole, delta)
    assert torch.equal(whole, want)
    rows = torch.tensor([5, 0, 63, 17])
    by_rows = y.clone()
    _accumulate_rows(by_rows, rows, delta[rows])
    expected = y.clone()
    expected[rows] = want[rows]
    assert torch.equal(by_rows, expected)
