"""The Triton kernels compile for an H100/H200 (sm_90) on any machine: PTX and cubin, no GPU.

The interpreter runs the kernels' arithmetic but not Triton's compiler, whose type and layout
checks only a real compile meets; without this a compile error would first show on a GPU.
The compiles run in a subprocess without TRITON_INTERPRET: under it Triton's own library
functions (tl.cdiv) are interpreter wrappers that its compiler cannot inline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

HOPPER_SHARED_BYTES = 232448  # the most shared memory one block may use on sm_90 (227 KiB)

# (BLOCK_M, BLOCK_R, BLOCK_K or BLOCK_N, SPLIT_K): a decode step at r=16, a prefill at r=64 with
# the shrink split over K (its atomics path).
CONFIGS = [
    (dtype, *blocks)
    for dtype in ("fp16", "bf16", "fp32")
    for blocks in ((16, 16, 128, 1), (64, 64, 128, 4))
]

_COMPILE = r"""
import json, sys, warnings
from pathlib import Path

import triton

nvidia = triton.backends.backends.get("nvidia")
ptxas = nvidia and Path(sys.modules[nvidia.compiler.__module__].__file__).parent / "bin" / "ptxas"
if not ptxas or not ptxas.exists():
    print(json.dumps({"skip": "this triton has no NVIDIA backend with ptxas"}))
    sys.exit(0)

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mintvcs.kernels import triton_ops

# Pointer arguments whose element type does not follow the activations' dtype.
POINTEE = {"a_table": "i64", "b_table": "i64", "sorted_ptr": "i64", "buf_ptr": "fp32", "scales_ptr": "fp32"}


def compile_for_sm90(kernel, dtype, constants):
    signature = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith(("_ptr", "_table")):
            signature[name] = "*" + POINTEE.get(name, dtype if name in ("x_ptr", "y_ptr") else "i32")
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
    return {"cubin": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared,
            "atomics": "atom" in compiled.asm["ptx"], "mma": "mma" in compiled.asm["ptx"]}


warnings.simplefilter("ignore", UserWarning)  # newer triton warns about its FP-fusion default
results = {}
for dtype, bm, br, bk, sk in json.loads(sys.argv[1]):
    upcast = dtype == "fp32"  # as add_lora_triton decides on a GPU
    shrink = dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, SPLIT_K=sk, UPCAST=upcast)
    expand = dict(BLOCK_M=bm, BLOCK_N=bk, BLOCK_R=br, UPCAST=upcast)
    results[f"{dtype}-{bm}-{br}-{bk}-{sk}"] = {
        "shrink": compile_for_sm90(triton_ops._shrink_kernel, dtype, shrink),
        "expand": compile_for_sm90(triton_ops._expand_kernel, dtype, expand),
    }
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(CONFIGS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


@pytest.mark.parametrize("dtype, block_m, block_r, block_k, split_k", CONFIGS)
def test_kernels_compile_for_sm90(
    compiled: dict[str, Any], dtype: str, block_m: int, block_r: int, block_k: int, split_k: int
) -> None:
    result = compiled[f"{dtype}-{block_m}-{block_r}-{block_k}-{split_k}"]
    for kernel in ("shrink", "expand"):
        assert result[kernel]["cubin"] > 0, f"{kernel}: ptxas produced no cubin"
        assert result[kernel]["shared"] <= HOPPER_SHARED_BYTES
    assert result["shrink"]["atomics"] == (split_k > 1)  # the K split accumulates with atomics
    if dtype != "fp32":
        # Tensor cores (Hopper's wgmma or the mma of earlier generations), not FMA loops.
        assert result["shrink"]["mma"] and result["expand"]["mma"]
