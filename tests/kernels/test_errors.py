"""Every bad input fails in the host wrapper with a LoraShapeError that names the value and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from mintvcs.errors import MintError
from mintvcs.kernels import (
    LoraBackendError,
    LoraShapeError,
    add_lora,
    add_lora_slices,
    group_tokens,
)

T, S, R, K, N = 5, 3, 4, 8, 6


def good() -> dict[str, Any]:
    return {
        "y": torch.zeros(T, N),
        "x": torch.randn(T, K),
        "lora_a": torch.randn(S, R, K),
        "lora_b": torch.randn(S, N, R),
        "token_slots": torch.tensor([0, 1, 2, -1, 0], dtype=torch.int32),
        "scales": torch.ones(S),
    }


def call(**override: Any) -> torch.Tensor:
    args = good()
    kw = {k: override.pop(k) for k in ("slot_ranks", "backend") if k in override}
    args.update(override)
    return add_lora(
        args["y"],
        args["x"],
        args["lora_a"],
        args["lora_b"],
        args["token_slots"],
        args["scales"],
        **kw,
    )


BAD: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    (
        "x int dtype",
        lambda: {
            "x": torch.ones(T, K, dtype=torch.int32),
            "y": torch.zeros(T, N, dtype=torch.int32),
        },
        "dtype torch.int32",
    ),
    (
        "y dtype differs",
        lambda: {"y": torch.zeros(T, N, dtype=torch.float16)},
        "y has dtype torch.float16",
    ),
    (
        "lora_a dtype differs",
        lambda: {"lora_a": torch.randn(S, R, K, dtype=torch.float64)},
        "lora_a has dtype torch.float64",
    ),
    (
        "lora_b dtype differs",
        lambda: {"lora_b": torch.randn(S, N, R).half()},
        "lora_b has dtype torch.float16",
    ),
    ("slots float", lambda: {"token_slots": torch.zeros(T)}, "token_slots has dtype torch.float32"),
    (
        "scales int",
        lambda: {"scales": torch.ones(S, dtype=torch.int64)},
        "scales has dtype torch.int64",
    ),
    ("x 1-D", lambda: {"x": torch.randn(K)}, "x has shape [8]"),
    (
        "x wrong K",
        lambda: {"x": torch.randn(T, K + 1)},
        "lora_a has shape [3, 4, 8]; expected [3, 4, 9]",
    ),
    ("lora_a 2-D", lambda: {"lora_a": torch.randn(R, K)}, "lora_a has shape [4, 8]"),
    (
        "lora_b wrong rank",
        lambda: {"lora_b": torch.randn(S, N, R + 1)},
        "lora_b has shape [3, 6, 5]",
    ),
    (
        "lora_b wrong slots",
        lambda: {"lora_b": torch.randn(S + 1, N, R)},
        "lora_b has shape [4, 6, 4]",
    ),
    ("y wrong width", lambda: {"y": torch.zeros(T, N + 1)}, "y has 7 columns"),
    ("y wrong rows", lambda: {"y": torch.zeros(T + 1, N)}, "y has 6 rows"),
    (
        "slots wrong length",
        lambda: {"token_slots": torch.zeros(T + 2, dtype=torch.int32)},
        "token_slots has 7",
    ),
    (
        "slots 2-D",
        lambda: {"token_slots": torch.zeros(T, 1, dtype=torch.int32)},
        "token_slots has shape [5, 1]",
    ),
    ("scales wrong length", lambda: {"scales": torch.ones(S + 1)}, "scales has shape [4]"),
    (
        "slot index >= S",
        lambda: {"token_slots": torch.tensor([0, 1, 3, -1, 0], dtype=torch.int32)},
        "slot index 3 but there are only 3 slots",
    ),
    (
        "slot index < -1",
        lambda: {"token_slots": torch.tensor([0, -2, 1, -1, 0], dtype=torch.int32)},
        "slot index -2",
    ),
    ("x not contiguous", lambda: {"x": torch.randn(K, T).T}, "x (shape [5, 8]) is not contiguous"),
    (
        "lora_a not contiguous",
        lambda: {"lora_a": torch.randn(S, K, R).transpose(1, 2)},
        "lora_a (shape [3, 4, 8]) is not contiguous",
    ),
    ("y transposed", lambda: {"y": torch.zeros(N, T).T}, "y has column stride 5"),
    (
        "scales on another device",
        lambda: {"scales": torch.ones(S, device="meta")},
        "scales is on meta but x is on cpu",
    ),
    (
        "lora_b on another device",
        lambda: {"lora_b": torch.randn(S, N, R, device="meta")},
        "lora_b[0] is on meta",
    ),
    (
        "slots on another device",
        lambda: {"token_slots": torch.zeros(T, dtype=torch.int32, device="meta")},
        "token_slots is on meta",
    ),
    (
        "slot_ranks above R",
        lambda: {"slot_ranks": torch.tensor([4, 5, 1], dtype=torch.int32)},
        "slot_ranks holds 5",
    ),
    (
        "slot_ranks negative",
        lambda: {"slot_ranks": torch.tensor([4, -1, 1], dtype=torch.int32)},
        "slot_ranks holds -1",
    ),
    (
        "slot_ranks wrong length",
        lambda: {"slot_ranks": torch.tensor([4, 1], dtype=torch.int32)},
        "slot_ranks has shape [2]",
    ),
    ("unknown backend", lambda: {"backend": "cuda"}, "unknown backend 'cuda'"),
]


@pytest.mark.parametrize(("name", "make", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_error(
    name: str, make: Callable[[], dict[str, Any]], needle: str
) -> None:
    with pytest.raises(LoraShapeError) as err:
        call(**make())
    assert needle in str(err.value), f"{name}: {err.value}"
    assert isinstance(err.value, MintError)


def test_good_input_passes() -> None:
    # The baseline the error cases perturb must itself be accepted.
    y = call()
    assert y[3].abs().sum() == 0 and y[0].abs().sum() > 0


def test_triton_on_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(LoraBackendError, match="Triton needs CUDA tensors"):
        call(backend="triton")


def test_groups_for_other_slot_count() -> None:
    args = good()
    groups = group_tokens(args["token_slots"], S + 2)
    with pytest.raises(LoraShapeError, match="built for 5 slots but lora_a has 3"):
        add_lora(args["y"], args["x"], args["lora_a"], args["lora_b"], groups, args["scales"])


def test_slices_of_different_rank() -> None:
    args = good()
    pairs = [(args["lora_a"], args["lora_b"]), (torch.randn(S, R + 1, K), torch.randn(S, 2, R + 1))]
    with pytest.raises(LoraShapeError, match=r"lora_a \(slice 1\) has shape \[3, 5, 8\]"):
        add_lora_slices(
            torch.zeros(T, N + 2), args["x"], pairs, args["token_slots"], args["scales"]
        )


def test_no_slices() -> None:
    args = good()
    with pytest.raises(LoraShapeError, match="at least one"):
        add_lora_slices(args["y"], args["x"], [], args["token_slots"], args["scales"])
