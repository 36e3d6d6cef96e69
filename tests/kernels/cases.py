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
    """Slot indices: 'mixed' (random, -1 included), 'none' (all -1), 'same' (all slot 0), 'runs'.

    Drawn on the generator's device, where they stay.
    """
    dev = gen.device
    if mix == "none":
        return torch.full((tokens,), -1, dtype=torch.int32, device=dev)
    if mix == "same":
        return torch.zeros(tokens, dtype=torch.int32, device=dev)
    if mix == "runs":  # prefill-like: contiguous requests, each on one slot
        cuts = sorted(torch.randint(0, tokens + 1, (3,), generator=gen, device=dev).tolist())
        ids = torch.randint(-1, num_slots, (4,), generator=gen, device=dev).tolist()
        out = torch.empty(tokens, dtype=torch.int32)
        for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, tokens], strict=True)):
            out[lo:hi] = ids[i]
        return out.to(dev)
    return torch.randint(-1, num_slots, (tokens,), generator=gen, dtype=torch.int32, device=dev)


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
    """Inputs whose padded ranks hold NaN, so any read of the padding shows up in y.

    Drawn on `device` with a generator there: the GPU grid's 4099-wide cases would otherwise
    spend most of their time in the CPU's random numbers and copies. So a seed gives other
    numbers on CUDA than on the CPU, and the same ones for every dtype and mix of a shape.
    """
    dev = torch.device(device)
    gen = torch.Generator(dev).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=dev)

    x = randn(tokens, in_features)
    a = randn(num_slots, rank, in_features) / in_features**0.5
    b = randn(num_slots, out_features, rank) / rank**0.5
    ranks = None
    if mixed_ranks:
        ranks = torch.randint(
            1, rank + 1, (num_slots,), generator=gen, dtype=torch.int32, device=dev
        )
        ranks[0] = rank  # slot 0 uses the full padded rank
        if num_slots >= 8:
            ranks[-1] = 0  # an empty slot: its tokens must come out untouched
        pad = torch.arange(rank, device=dev)[None, :] >= ranks[:, None]  # [slots, rank]
        a.masked_fill_(pad[:, :, None], float("nan"))
        b.masked_fill_(pad[:, None, :], float("nan"))
    scales = torch.rand(num_slots, generator=gen, device=dev) * 2 - 0.5
    y0 = randn(tokens, out_features)
    y0[::2, ::3] = -0.0  # y + 0.0 would flip these bits: untouched rows must keep them
    slots = make_slots(tokens, num_slots, mix, gen)
    return Case(
        y0=y0.to(dtype),
        x=x.to(dtype),
        a=a.to(dtype),
        b=b.to(dtype),
        slots=slots,
        scales=scales,
        ranks=ranks,
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
    """Untouched rows bit-identical, the others within the dtype's tolerance of the reference.

    Compared where `got` lives: on a GPU, copying 4099-wide results back would cost more than
    the comparison.
    """
    dev = got.device
    want, y0, slots = want.to(dev), case.y0.to(dev), case.slots.to(dev)
    idle = slots < 0
    if case.ranks is not None:
        idle |= case.ranks.to(dev)[slots.clamp(min=0).long()] == 0
    assert same_bits(got[idle], y0[idle]), "rows without an adapter changed"
    assert not torch.isnan(got).any(), "NaN in y: padding past a slot's real rank was read"
    rtol, atol = TOL[got.dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)
