"""The Triton kernels compile for an H100/H200 (sm_90) on any machine, without spilling registers.

The interpreter runs the kernels' arithmetic but not Triton's compiler, whose type and layout
checks only a real compile meets; without this a compile error would first show on a GPU. Each
tile shape add_lora_triton launches (triton_ops.tile_config) is compiled to PTX and a cubin with
the Triton wheel's own ptxas, and the cubin's resource usage (its cuobjdump) must show no stack:
a spilled tile reads and writes local memory on every K step.
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

# (dtype, BLOCK_M, padded rank, SPLIT_K): every token block and rank tile the op launches, in
# bf16 (the GPU's default) and fp32; fp16 (bf16's layouts) at a decode and a prefill shape. Some
# split the shrink over K (its atomics path).
CONFIGS = [
    *(
        (dtype, bm, rank, 4 if bm == 64 else 1, True)
        for dtype in ("bf16", "fp32")
        for bm in (16, 32, 64)
        for rank in (16, 32, 64)
    ),
    ("fp16", 16, 16, 1, True),
    ("fp16", 64, 64, 4, True),
    ("bf16", 16, 16, 1, False),  # factors whose rows or slices are off 16 bytes (odd K or r)
    ("bf16", 16, 8, 1, True),  # a padded rank of 8: aligned, but not known as a multiple of 16
]

_COMPILE = r"""
import json, re, subprocess, sys, tempfile, warnings
from pathlib import Path

import triton

nvidia = triton.backends.backends.get("nvidia")
tools = nvidia and Path(sys.modules[nvidia.compiler.__module__].__file__).parent / "bin"
if not tools or not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
    print(json.dumps({"skip": "this triton has no NVIDIA backend with ptxas and cuobjdump"}))
    sys.exit(0)

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mintvcs.kernels import triton_ops

# Pointer arguments whose element type does not follow the activations' dtype.
POINTEE = {"a_table": "i64", "b_table": "i64", "sorted_ptr": "i64", "buf_ptr": "fp32", "scales_ptr": "fp32"}


def resources(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", f.name],
                              capture_output=True, text=True, check=True).stdout
    line = next(l for l in text.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in (p.split(":") for p in line.split() if p.count(":") == 1 and p.split(":")[1].isdigit())}


# What the JIT tells the compiler at run time of an 8B model's call: tensors on 16 bytes, and
# these integers multiples of 16 (K = 4096, contiguous rows; the padded rank when it is one).
MULTIPLES_OF_16 = {"in_features", "stride_xm", "stride_ym"}


def compile_for_sm90(kernel, dtype, constants, warps, padded_rank):
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        if name.endswith(("_ptr", "_table")):
            signature[name] = "*" + POINTEE.get(name, dtype if name in ("x_ptr", "y_ptr") else "i32")
        else:
            signature[name] = "i32"
        if (
            name.endswith(("_ptr", "_table"))
            or name in MULTIPLES_OF_16
            or (name == "rank" and padded_rank % 16 == 0)
        ):
            attrs[(index,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    used = resources(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return {"cubin": len(compiled.asm["cubin"]), "shared": compiled.metadata.shared,
            "registers": used["REG"], "stack": used["STACK"],
            # the K split's sums: relaxed reductions (red), or atomics that return (atom)
            "atomics": re.search(r"(^|\s)(red|atom)\.", ptx, re.M) is not None, "mma": "mma" in ptx,
            # one element at a time: a 2-byte load (bf16/fp16) or store
            "scalar_loads": ptx.count("ld.global.b16"), "vector_stores": "st.global.v4" in ptx}


warnings.simplefilter("ignore", UserWarning)  # newer triton warns about its FP-fusion default
results = {}
for dtype, bm, rank, sk, aligned in json.loads(sys.argv[1]):
    fp32 = dtype == "fp32"  # add_lora_triton's UPCAST on a GPU
    br, widest, warps = triton_ops.tile_config(bm, rank, fp32)
    vec = dict(ALIGNED=aligned, VEC_SHIFT=2 if fp32 else 3)  # 16 bytes: 4 or 8 elements
    shrink = dict(BLOCK_M=bm, BLOCK_R=br, BLOCK_K=widest, SPLIT_K=sk, UPCAST=fp32, **vec)
    expand = dict(BLOCK_M=bm, BLOCK_N=widest, BLOCK_R=br, UPCAST=fp32, **vec)
    results[f"{dtype}-{bm}-{rank}-{sk}-{aligned}"] = {
        "shrink": compile_for_sm90(triton_ops._shrink_kernel, dtype, shrink, warps, rank),
        "expand": compile_for_sm90(triton_ops._expand_kernel, dtype, expand, warps, rank),
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
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


@pytest.mark.parametrize("dtype, block_m, rank, split_k, aligned", CONFIGS)
def test_kernels_compile_for_sm90_without_spills(
    compiled: dict[str, Any], dtype: str, block_m: int, rank: int, split_k: int, aligned: bool
) -> None:
    result = compiled[f"{dtype}-{block_m}-{rank}-{split_k}-{aligned}"]
    for kernel in ("shrink", "expand"):
        used = result[kernel]
        assert used["cubin"] > 0, f"{kernel}: ptxas produced no cubin"
        assert used["shared"] <= HOPPER_SHARED_BYTES
        # fp32 tiles (FMA dots) may keep a stack frame of a few words beside their registers.
        assert used["stack"] <= (32 if dtype == "fp32" else 0), f"{kernel} spills: {used}"
    assert result["shrink"]["atomics"] == (split_k > 1)  # the K split accumulates with atomics
    if dtype != "fp32":
        # Tensor cores (Hopper's wgmma or the mma of earlier generations), not FMA loops.
        assert result["shrink"]["mma"] and result["expand"]["mma"]
    if aligned and dtype != "fp32" and rank % 16 == 0:
        # Every load of x, A, B and y in 16-byte pieces (the op is bound by reading them), and
        # y written so. (A padded rank of 8 leaves B's loads scalar: the JIT only tells the
        # compiler of integers that are multiples of 16.)
        assert result["shrink"]["scalar_loads"] == 0
        assert result["expand"]["scalar_loads"] == 0
        assert result["expand"]["vector_stores"]


def test_alignment_is_claimed_only_where_it_holds() -> None:
    import torch

    from mintvcs.kernels.triton_ops import vector_aligned

    def pools(slots: int, rank: int, k: int, widths: list[int], dtype: torch.dtype) -> list[Any]:
        return [
            (torch.zeros(slots, rank, k, dtype=dtype), torch.zeros(slots, w, rank, dtype=dtype))
            for w in widths
        ]

    qkv = [4096, 1024, 1024]
    cols = [0, 4096, 5120]
    assert vector_aligned(pools(4, 16, 4096, qkv, torch.bfloat16), 2, cols, qkv)
    assert vector_aligned(pools(4, 4, 4096, qkv, torch.float32), 4, cols, qkv)  # 4 x 4 bytes
    assert not vector_aligned(pools(4, 16, 4099, qkv, torch.bfloat16), 2, cols, qkv)  # odd K
    assert not vector_aligned(pools(4, 4, 4096, qkv, torch.bfloat16), 2, cols, qkv)  # 8-byte rows
    odd = [4096, 1020, 1028]
    assert not vector_aligned(pools(4, 16, 4096, odd, torch.bfloat16), 2, [0, 4096, 5116], odd)
    # A factor tensor that starts 2 bytes into its storage (a view): no claim.
    _, b = pools(1, 16, 4096, [64], torch.bfloat16)[0]
    storage = torch.zeros(16 * 4096 + 1, dtype=torch.bfloat16)
    shifted = [(storage[1:].view(1, 16, 4096), b)]
    assert not vector_aligned(shifted, 2, [0], [64])
