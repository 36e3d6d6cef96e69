"""Every bad input fails in the host wrapper with a LoraShapeError that names the value and the fix."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch

from mintvcs.errors import MintError
from mintvcs.kernels import (
    LoraBackendError,
    LoraShapeError,
    add_lora,
    add_lora_reference,
    add_lora_slices,
    group_tokens,
)
from mintvcs.kernels.checks import _rows_meet

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


def test_slice_0_of_the_wrong_rank_is_named() -> None:
    args = good()
    pairs = [(torch.randn(R, K), args["lora_b"]), (args["lora_a"], args["lora_b"])]
    with pytest.raises(LoraShapeError, match=r"lora_a \(slice 0\) has shape \[4, 8\]"):
        add_lora_slices(
            torch.zeros(T, 2 * N), args["x"], pairs, args["token_slots"], args["scales"]
        )


@pytest.mark.parametrize("num_slots", [3.0, None, True, "3"], ids=repr)
def test_num_slots_not_an_int(num_slots: object) -> None:
    with pytest.raises(LoraShapeError, match=f"num_slots is {re.escape(repr(num_slots))}"):
        group_tokens(good()["token_slots"], num_slots)  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_y_requiring_grad(backend: str) -> None:
    # Refused alike on both backends (torch's in-place error on one, an untracked write on the
    # other); under no_grad both write y, as an optimizer step would.
    y = torch.zeros(T, N, requires_grad=True)
    with pytest.raises(LoraShapeError, match="y requires grad"):
        call(y=y, backend=backend)
    with torch.no_grad():
        call(y=y, backend=backend)
    assert y[0].abs().sum() > 0 and y[3].abs().sum() == 0


def test_no_slices() -> None:
    args = good()
    with pytest.raises(LoraShapeError, match="at least one"):
        add_lora_slices(args["y"], args["x"], [], args["token_slots"], args["scales"])


def _slices_call(slices: object) -> None:
    args = good()
    add_lora_slices(args["y"], args["x"], slices, args["token_slots"], args["scales"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda a, b: (p for p in [(a, b)]), "slices is a generator; pass a list or tuple"),
        (lambda a, b: [None], "slice 0 is None; each slice must be a pair"),
        (lambda a, b: [(a, b), (a, b, b)], "slice 1 is a tuple of 3"),
        (lambda a, b: [a], "slice 0 is a Tensor"),
        (lambda a, b: a, "slices is a Tensor"),
    ],
    ids=["generator", "None", "triple", "bare tensor slice", "tensor as slices"],
)
def test_malformed_slices(make: Callable[[Any, Any], object], needle: str) -> None:
    args = good()
    with pytest.raises(LoraShapeError) as err:
        _slices_call(make(args["lora_a"], args["lora_b"]))
    assert needle in str(err.value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    "make_y",
    [
        lambda: torch.zeros(1, N).expand(T, N),  # every row is one row
        lambda: torch.zeros(T * N).as_strided((T, N), (N - 2, 1)),  # rows share 2 elements
        lambda: torch.zeros(1, 1).expand(T, 1),  # a one-column y with row stride 0
    ],
    ids=["expand", "as_strided", "one column"],
)
def test_y_with_overlapping_rows(make_y: Callable[[], torch.Tensor], backend: str) -> None:
    # Several tokens would add into the same memory; Triton gave a silently wrong result.
    y = make_y()
    args = good()
    if y.shape[1] != N:
        args["lora_b"] = args["lora_b"][:, :1].contiguous()
    with pytest.raises(LoraShapeError, match="rows overlap in memory"):
        call(y=y, lora_b=args["lora_b"], backend=backend)
    assert y.abs().sum() == 0


def test_scales_dtype_message_names_the_accepted_dtypes() -> None:
    with pytest.raises(LoraShapeError, match="use float32 \\(float16 and bfloat16 are accepted"):
        call(scales=torch.ones(S, dtype=torch.float64))


_IMPORT_ORDER = """
import torch
import mintvcs.kernels.triton_ops  # decorates the kernels while TRITON_INTERPRET is unset
import os
os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels are already compiled-mode
from mintvcs.kernels import LoraBackendError, add_lora
try:
    add_lora(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(1, 2, 4), torch.ones(1, 3, 2),
             torch.zeros(2, dtype=torch.int32), torch.ones(1), backend="triton")
except LoraBackendError as err:
    print("LoraBackendError:", err)
"""


def test_triton_imported_before_interpreter_was_requested() -> None:
    # A fresh interpreter: this process imported triton_ops with TRITON_INTERPRET=1 already set.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors even where a GPU exists
    run = subprocess.run(
        [sys.executable, "-c", _IMPORT_ORDER], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LoraBackendError:" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "imported before TRITON_INTERPRET=1 was set" in run.stdout


@pytest.mark.parametrize(
    ("value", "on"),
    [
        ("1", True),
        ("true", True),
        ("ON", True),
        ("yes", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("2", False),
    ],
)
def test_the_interpreter_flag_reads_as_triton_reads_it(
    monkeypatch: pytest.MonkeyPatch, value: str, on: bool
) -> None:
    from mintvcs.kernels.checks import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() is on


def _square() -> dict[str, Any]:
    """good() with out_features = in_features, so that y may be x itself."""
    args = good()
    args["lora_b"] = torch.randn(S, K, R)
    return args


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_y_partly_overlapping_x(backend: str) -> None:
    # y = x shifted by one row: the reference reads rows the previous token already updated,
    # the backends do not; refused rather than backend-dependent.
    args = _square()
    buf = torch.randn(T + 1, K)
    args.update(x=buf[1:], y=buf[:-1])
    with pytest.raises(LoraShapeError, match="y partly overlaps x in memory"):
        call(backend=backend, **args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_y_overlapping_a_factor(backend: str) -> None:
    args = good()
    args["y"] = args["lora_b"].view(-1)[: T * N].view(T, N)
    with pytest.raises(LoraShapeError, match=r"y overlaps lora_b\[0\] in memory"):
        call(backend=backend, **args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cols", [None, (2, 6)], ids=["y is x", "columns of x"])
def test_y_in_x_own_rows_still_works(backend: str, cols: tuple[int, int] | None) -> None:
    args = _square()
    x = args["x"]
    if cols is not None:
        args["lora_b"] = args["lora_b"][:, : cols[1] - cols[0]].contiguous()
    want = x.clone() if cols is None else x[:, cols[0] : cols[1]].clone()
    add_lora_reference(
        want, x.clone(), args["lora_a"], args["lora_b"], args["token_slots"], args["scales"]
    )
    args["y"] = x if cols is None else x[:, cols[0] : cols[1]]
    got = call(backend=backend, **args)
    torch.testing.assert_close(got, want)


def test_rows_meet_matches_a_byte_by_byte_check() -> None:
    # The closed form behind the overlap check, against the bytes themselves.
    base = torch.zeros(64)
    for stride, width, tokens, lo, hi in itertools.product(
        (3, 5, 8), (1, 3), (1, 2, 4), range(0, 40, 3), (1, 4, 9)
    ):
        if width > stride:
            continue
        y = base.as_strided((tokens, width), (stride, 1), 2)
        rows = {2 + t * stride + c for t in range(tokens) for c in range(width)}
        want = any(lo <= e < lo + hi for e in rows)
        start = base.data_ptr()
        got = _rows_meet(y, start + 4 * lo, start + 4 * (lo + hi))
        assert got == want, (stride, width, tokens, lo, hi)
