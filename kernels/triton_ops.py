"""The Triton backend: shrink (x @ Aᵀ into fp32 [tokens, rank]) then expand (@ Bᵀ, scaled, into y).

Both kernels share one grid layout, fixed by (tokens, slots, shapes) alone:
  axis 0: token blocks, max_blocks(T, S, BM) of them; block b serves slot block_slot[b]
          (-1 = idle, the program exits at once)
  axis 1: shrink: rank tiles x K splits; expand: output-column tiles
  axis 2: output slices (fused q/k/v or gate/up), whose lora tensors are reached through a
          table of addresses so that one launch serves them all
Data decides only which programs exit early and how many rank tiles a slot loops over.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .groups import SlotGroups


@triton.jit
def _shrink_kernel(
    x_ptr,  # [tokens, in]
    a_table,  # [slices] int64 addresses of lora_a tensors [slots, rank, in]
    buf_ptr,  # [slices, tokens, rank] fp32
    sorted_ptr,  # [tokens] int64 token ids grouped by slot
    slot_end_ptr,  # [slots] int32
    block_slot_ptr,  # [blocks] int32, -1 = idle
    block_start_ptr,  # [blocks] int32
    ranks_ptr,  # [slots] int32 real ranks
    num_tokens,
    in_features,
    rank,
    stride_xm,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 inputs (no tf32), or bf16 under the interpreter
    ALIGNED: tl.constexpr,  # the factors' addresses and rows start on 16 bytes (host-checked)
    VEC_SHIFT: tl.constexpr,  # log2 of the elements in 16 bytes of the factors' dtype
):
    pid_b = tl.program_id(0)
    pid_rk = tl.program_id(1)
    pid_s = tl.program_id(2)
    slot = tl.load(block_slot_ptr + pid_b)
    if slot < 0:
        return
    real_rank = tl.minimum(tl.load(ranks_ptr + slot), rank)
    r_lo = (pid_rk // SPLIT_K) * BLOCK_R
    if r_lo >= real_rank:  # padding: no loads, no math
        return
    k_split = pid_rk % SPLIT_K

    pos = tl.load(block_start_ptr + pid_b) + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = pos < tl.load(slot_end_ptr + slot)  # [BM]
    tok = tl.load(sorted_ptr + pos, mask=row_ok, other=0).to(tl.int64)  # [BM]
    offs_r = r_lo + tl.arange(0, BLOCK_R)  # [BR]
    rank_ok = offs_r < real_rank  # [BR]

    a_ptr = tl.load(a_table + pid_s).to(tl.pointer_type(x_ptr.dtype.element_ty))
    if ALIGNED:  # an address read from a table says nothing of its alignment: without this,
        a_ptr = tl.multiple_of(a_ptr, 16)  # every load of A is one element wide
    a_ptr += slot.to(tl.int64) * rank * in_features
    k_chunk = tl.cdiv(in_features, SPLIT_K * BLOCK_K) * BLOCK_K
    k_lo = k_split * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, in_features)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)  # [tokens, rank]
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)  # [BK]
        k_ok = offs_k < k_hi
        xt = tl.load(
            x_ptr + tok[:, None] * stride_xm + offs_k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )  # [tokens, BK]
        at = tl.load(
            a_ptr + offs_r[None, :] * in_features + offs_k[:, None],
            mask=rank_ok[None, :] & k_ok[:, None],
            other=0.0,
        )  # [BK, rank]
        if UPCAST:
            # Each K tile's dot from zero, then added: chaining acc through tl.dot makes one
            # long sequential fp32 sum per output, which at K=4099 erred past the 1e-5 tolerance.
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)

    out = buf_ptr + pid_s * num_tokens * rank + tok[:, None] * rank + offs_r[None, :]
    if ALIGNED:
        # Whole 16-byte vectors of the buffer's row (past the real rank: what x times A's
        # masked zeros gave; the expand never uses those columns).
        vec_rank = ((real_rank + (1 << VEC_SHIFT) - 1) >> VEC_SHIFT) << VEC_SHIFT
        ok = row_ok[:, None] & (offs_r < vec_rank)[None, :]
    else:
        ok = row_ok[:, None] & rank_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc, mask=ok)
    else:  # relaxed: the expand reads the sums after this launch ends
        tl.atomic_add(out, acc, mask=ok, sem="relaxed")


@triton.jit
def _expand_kernel(
    y_ptr,  # [tokens, sum of widths]
    b_table,  # [slices] int64 addresses of lora_b tensors [slots, width_i, rank]
    widths_ptr,  # [slices] int32
    col_ptr,  # [slices] int32 first column of each slice in y
    buf_ptr,  # [slices, tokens, rank] fp32
    sorted_ptr,  # [tokens] int64
    slot_end_ptr,  # [slots] int32
    block_slot_ptr,  # [blocks] int32
    block_start_ptr,  # [blocks] int32
    ranks_ptr,  # [slots] int32
    scales_ptr,  # [slots] fp32
    num_tokens,
    rank,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,  # fp32 inputs (no tf32), or bf16 under the interpreter
    ALIGNED: tl.constexpr,  # the factors' addresses, rows and y's slices start on 16 bytes
    VEC_SHIFT: tl.constexpr,  # log2 of the elements in 16 bytes of the factors' dtype
):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    slot = tl.load(block_slot_ptr + pid_b)
    if slot < 0:
        return
    width = tl.load(widths_ptr + pid_s)
    if ALIGNED:  # then the column mask holds in runs of 8, and y's row moves as vectors
        width = tl.multiple_of(width, 8)
    n_lo = pid_n * BLOCK_N
    if n_lo >= width:  # this slice is narrower than the widest one
        return
    real_rank = tl.minimum(tl.load(ranks_ptr + slot), rank)
    if real_rank <= 0:  # y must stay bit-identical, so don't even add zero
        return

    # Under ALIGNED, h and B are read in whole 16-byte vectors: up to the real rank rounded up
    # (within the padded rank, a multiple of the vector), the lanes past it zeroed after.
    load_rank = real_rank
    if ALIGNED:
        load_rank = ((real_rank + (1 << VEC_SHIFT) - 1) >> VEC_SHIFT) << VEC_SHIFT
    pos = tl.load(block_start_ptr + pid_b) + tl.arange(0, BLOCK_M)  # [BM]
    row_ok = pos < tl.load(slot_end_ptr + slot)
    tok = tl.load(sorted_ptr + pos, mask=row_ok, other=0).to(tl.int64)  # [BM]
    offs_n = n_lo + tl.arange(0, BLOCK_N)  # [BN]
    col_ok = offs_n < width

    b_ptr = tl.load(b_table + pid_s).to(tl.pointer_type(y_ptr.dtype.element_ty))
    if ALIGNED:  # as in the shrink: vector loads of B
        b_ptr = tl.multiple_of(b_ptr, 16)
    b_ptr += slot.to(tl.int64) * width * rank
    h_ptr = buf_ptr + pid_s * num_tokens * rank + tok[:, None] * rank  # [BM, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # [tokens, out]
    for r in range(0, real_rank, BLOCK_R):  # stops at the real rank: padding costs nothing
        offs_r = r + tl.arange(0, BLOCK_R)
        r_ok = offs_r < real_rank
        load_ok = offs_r < load_rank
        h = tl.load(h_ptr + offs_r[None, :], mask=row_ok[:, None] & load_ok[None, :], other=0.0)
        # h: [tokens, BR] fp32
        bt = tl.load(
            b_ptr + offs_n[None, :] * rank + offs_r[:, None],
            mask=load_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # [BR, out]
        if ALIGNED:  # lanes read past the real rank become zeros, whatever the padding holds
            h = tl.where(r_ok[None, :], h, 0.0)
            bt = tl.where(r_ok[:, None], bt, 0.0)
        if UPCAST:
            acc = tl.dot(h, bt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(h.to(bt.dtype), bt, acc)

    scale = tl.load(scales_ptr + slot)
    col = tl.load(col_ptr + pid_s)
    if ALIGNED:  # each slice starts on 16 bytes of y's row: vector loads and stores of y
        col = tl.multiple_of(col, 8)
    yp = y_ptr + tok[:, None] * stride_ym + col + offs_n[None, :]  # [tokens, out]
    ok = row_ok[:, None] & col_ok[None, :]
    cur = tl.load(yp, mask=ok, other=0.0)
    tl.store(yp, (cur.to(tl.float32) + scale * acc).to(cur.dtype), mask=ok)


# Whether the kernels run in Triton's CPU interpreter. Triton reads TRITON_INTERPRET once, when
# the decorators above run, so the kernels' type says it; the variable may have changed since.
INTERPRETED = not isinstance(_shrink_kernel, triton.runtime.JITFunction)


# Address tables and small constant tensors, cached so that a steady-state step makes none:
# the engine's slot pools live as long as the engine, so their addresses repeat every step.
_CACHE: dict[tuple[object, ...], torch.Tensor] = {}
_CACHE_LIMIT = 4096


def _cached(
    key: tuple[object, ...], make: list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    hit = _CACHE.get(key)
    if hit is None:
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        hit = torch.tensor(make, dtype=dtype, device=device)
        _CACHE[key] = hit
    return hit


def address_tables() -> list[torch.Tensor]:
    """The device tables the launches read (factor addresses, widths): a CUDA graph must keep them alive."""
    return list(_CACHE.values())


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def vector_aligned(
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    element_size: int,
    cols: Sequence[int],
    widths: Sequence[int],
) -> bool:
    """Whether the kernels may tell the compiler that the factors and y's slices sit on 16 bytes
    (ALIGNED): every factor tensor starts there, its rows are multiples of 16 bytes long, and
    each slice of y starts and ends on a multiple of 8 elements."""
    # The compiler cannot see an address read from a table; a false claim would fault.
    per16 = 16 // element_size
    _, rank, in_features = slices[0][0].shape
    return (
        all(t.data_ptr() % 16 == 0 for pair in slices for t in pair)
        and in_features % per16 == 0
        and rank % per16 == 0
        and all(c % 8 == 0 for c in (*cols, *widths))
    )


def tile_config(block_m: int, rank: int, fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_R, widest BLOCK_K / BLOCK_N, num_warps) for a token block and a padded rank.

    Chosen so that no tile spills registers on an H100/H200 (sm_90), read from the compiled
    cubins' resource usage (tests/kernels/test_compile_hopper.py checks it): 4 warps and K
    tiles of 128 for the small decode tiles; 8 warps past 512 tile cells (4 warps spilled up to
    1.5 KiB per thread at 64 x 64); K tiles of 64 past 2048 cells. fp32 dots run on FMA units
    and hold their operands in registers: 8 warps past 256 cells, K tiles of 64 from 512 cells
    and of 32 at 64 x 64.
    """
    block_r = _pow2(rank, 16, 64)
    cells = block_m * block_r
    if fp32:
        return (
            block_r,
            32 if cells >= 4096 else 64 if cells >= 512 else 128,
            4 if cells <= 256 else 8,
        )
    return block_r, 64 if cells >= 2048 else 128, 4 if cells <= 512 else 8


@functools.cache
def _sm_count(index: int | None) -> int:
    return int(torch.cuda.get_device_properties(index or 0).multi_processor_count)


def _split_k(device: torch.device, programs: int, in_features: int, block_k: int) -> int:
    # Decode batches give the shrink only a few programs, each streaming a long K; splitting K
    # fills the GPU. Depends on shapes only, so the grid stays fixed for a given batch size.
    if device.type != "cuda" or programs <= 0:
        return 1
    want = _sm_count(device.index) // programs
    return max(1, min(want, 8, in_features // (4 * block_k)))


def add_lora_triton(
    y: torch.Tensor,  # [tokens, sum of widths]
    x: torch.Tensor,  # [tokens, in]
    slices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    groups: SlotGroups,
    scales: torch.Tensor,  # [slots]
    slot_ranks: torch.Tensor | None,  # [slots]
    *,
    split_k: int | None = None,
    shrink_only: bool = False,
) -> torch.Tensor:
    """Launch shrink then expand for every slice; inputs must already have passed checks.check_call.

    split_k overrides the K split of the shrink; shrink_only (for benchmarks) skips the expand.
    """
    tokens, in_features = x.shape
    num_slices = len(slices)
    num_slots, rank, _ = slices[0][0].shape
    blocks = groups.blocks()
    nb = int(blocks.block_slot.shape[0])
    if tokens == 0 or nb == 0 or rank == 0:
        return y
    dev = x.device
    a_table = _cached(
        ("a", dev, *(a.data_ptr() for a, _ in slices)),
        [a.data_ptr() for a, _ in slices],
        torch.int64,
        dev,
    )
    b_table = _cached(
        ("b", dev, *(b.data_ptr() for _, b in slices)),
        [b.data_ptr() for _, b in slices],
        torch.int64,
        dev,
    )
    widths = [int(b.shape[1]) for _, b in slices]
    cols = [sum(widths[:i]) for i in range(num_slices)]
    widths_t = _cached(("w", dev, *widths), widths, torch.int32, dev)
    cols_t = _cached(("c", dev, *cols), cols, torch.int32, dev)
    if slot_ranks is None:
        ranks = _cached(("r", dev, num_slots, rank), [rank] * num_slots, torch.int32, dev)
    else:
        ranks = slot_ranks.to(torch.int32).contiguous()
    # The kernels index these as flat arrays: a strided view (scales[::2], an expand) would be
    # read as if contiguous. The engine's own are contiguous: no copy then.
    scales32 = scales.to(torch.float32).contiguous()
    # fp32 stays exact (no tf32). Triton's CPU interpreter multiplies bf16 tiles as raw uint16
    # bits, so there bf16 tiles go through fp32 too; on a GPU bf16 uses the tensor cores.
    upcast = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and INTERPRETED)

    aligned = vector_aligned(slices, x.element_size(), cols, widths)

    bm = blocks.block_m
    br, widest, warps = tile_config(bm, rank, x.dtype == torch.float32)
    bk = _pow2(in_features, 16, widest)
    rank_tiles = triton.cdiv(rank, br)
    sk = (
        split_k
        if split_k is not None
        else _split_k(dev, nb * rank_tiles * num_slices, in_features, bk)
    )
    alloc = torch.zeros if sk > 1 else torch.empty  # atomics need a zeroed buffer
    buf = alloc(
        (num_slices, tokens, rank), dtype=torch.float32, device=dev
    )  # [slices, tokens, rank]

    # Triton launches on the current CUDA device and its stream, not on the tensors' device: on
    # a second GPU the kernels would otherwise run on the first one with the second's pointers.
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        _shrink_kernel[(nb, rank_tiles * sk, num_slices)](
            x,
            a_table,
            buf,
            groups.sorted_tokens,
            groups.slot_end,
            blocks.block_slot,
            blocks.block_start,
            ranks,
            tokens,
            in_features,
            rank,
            x.stride(0),
            BLOCK_M=bm,
            BLOCK_R=br,
            BLOCK_K=bk,
            SPLIT_K=sk,
            UPCAST=upcast,
            ALIGNED=aligned,
            VEC_SHIFT=(16 // x.element_size()).bit_length() - 1,
            num_warps=warps,
        )
        if shrink_only:
            return y
        bn = _pow2(max(widths), 16, widest if dev.type == "cuda" else 64)
        _expand_kernel[(nb, triton.cdiv(max(widths), bn), num_slices)](
            y,
            b_table,
            widths_t,
            cols_t,
            buf,
            groups.sorted_tokens,
            groups.slot_end,
            blocks.block_slot,
            blocks.block_start,
            ranks,
            scales32,
            tokens,
            rank,
            y.stride(0),
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_R=br,
            UPCAST=upcast,
            ALIGNED=aligned,
            VEC_SHIFT=(16 // x.element_size()).bit_length() - 1,
            num_warps=warps,
        )
    return y
