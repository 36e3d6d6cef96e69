"""Random add_lora inputs with known-bad padding, and the tolerance checks shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 4e-2),
}


@dataclass
class Case:
    """One call's inputs; y0 is the untouched output."""

    y0: torch.Tensor  # [tokens, out]
    x: torch.Tensor  # [tokens, in]
    a: torch.Tensor  # [slots, rank, in]
    b: torch.Tensor  # [slots, out, rank]
    slots: torch.Tensor  # [tokens] int32
    scales: torch.Tensor  # [slots] fp32
    ranks: torch.Tensor | None  # [slots] int32

    def to(self, device: str) -> Case:
        """The same case on another device."""
        return Case(
            y0=self.y0.to(device),
            x=self.x.to(device),
            a=self.a.to(device),
            b=self.b.to(device),
            slots=self.slots.to(device),
            scales=self.scales.to(device),
            ranks=None if self.ranks is None else self.ranks.to(device),
        )


def device_for(backend: str) -> str:
    """Where a backend's test tensors live: Triton compiled needs CUDA, interpreted runs on CPU."""
    from mintvcs.kernels.checks import interpreting

    if backend == "triton" and torch.cuda.is_available() and not interpreting():
        return "cuda"
    return "cpu"


def make_slots(tokens: int, num_slots: int, mix: str, gen: torch.Generator) -> torch.Tensor:
    """Slot indices: 'mixed' (random, -1 included), 'none' (all -1), 'same' (all slot 0), 'runs'."""
    if mix == "none":
        return torch.full((tokens,), -1, dtype=torch.int32)
    if mix == "same":
        return torch.zeros(tokens, dtype=torch.int32)
    if mix == "runs":  # prefill-like: contiguous requests, each on one slot
        cuts = sorted(torch.randint(0, tokens + 1, (3,), generator=gen).tolist())
        ids = torch.randint(-1, num_slots, (4,), generator=gen).tolist()
        out = torch.empty(tokens, dtype=torch.int32)
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, tokens], strict=True)):
            out[lo:hi] = ids[i]
        return out
    return torch.randint(-1, num_slots, (tokens,), generator=gen, dtype=torch.int32)


def make_case(
    tokens: int,
    num_slots: int,
    rank: int,
    in_features: int,
    out_features: int,
    dtype: torch.dtype,
    mix: str,
    *,
    seed: int = 0,
    mixed_ranks: bool = True,
    device: str = "cpu",
) -> Case:
    """Inputs whose padded ranks hold NaN, so any read of the padding shows up in y."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=gen)
    a = torch.randn(num_slots, rank, in_features, generator=gen) / in_features**0.5
    b = torch.randn(num_slots, out_features, rank, generator=gen) / rank**0.5
    ranks = None
    if mixed_ranks:
        ranks = torch.randint(1, rank + 1, (num_slots,), generator=gen, dtype=torch.int32)
        ranks[0] = rank  # slot 0 uses the full padded rank
        if num_slots >= 8:
            ranks[-1] = 0  # an empty slot: its tokens must come out untouched
        for s in range(num_slots):
            a[s, int(ranks[s]) :] = float("nan")
            b[s, :, int(ranks[s]) :] = float("nan")
    scales = torch.rand(num_slots, generator=gen) * 2 - 0.5
    y0 = torch.randn(tokens, out_features, generator=gen)
    y0[::2, ::3] = -0.0  # y + 0.0 would flip these bits: untouched rows must keep them
    slots = make_slots(tokens, num_slots, mix, gen)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return Case(
        y0=put(y0),
        x=put(x),
        a=put(a),
        b=put(b),
        slots=slots.to(device),
        scales=scales.to(device),
        ranks=None if ranks is None else ranks.to(device),
    )


def expected(case: Case) -> torch.Tensor:
    """The reference result for case (computed on CPU)."""
    from mintvcs.kernels import add_lora_reference

    def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.cpu()

    y = case.y0.cpu().clone()
    add_lora_reference(
        y,
        case.x.cpu(),
        case.a.cpu(),
        case.b.cpu(),
        case.slots.cpu(),
        case.scales.cpu(),
        cpu(case.ranks),
    )
    return y


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal treats -0.0 and 0.0 as equal)."""
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    return a.dtype == b.dtype and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def assert_matches(case: Case, got: torch.Tensor, want: torch.Tensor) -> None:
    """Untouched rows bit-identical, the others within the dtype's tolerance of the reference."""
    got, want = got.cpu(), want.cpu()
    y0 = case.y0.cpu()
    slots = case.slots.cpu()
    idle = slots < 0
    if case.ranks is not None:
        idle |= case.ranks.cpu()[slots.clamp(min=0).long()] == 0
    assert same_bits(got[idle], y0[idle]), "rows without an adapter changed"
    assert not torch.isnan(got).any(), "NaN in y: padding past a slot's real rank was read"
    rtol, atol = TOL[got.dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
