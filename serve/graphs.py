"""Decode steps replayed from CUDA graphs: one capture per (batch bucket, length bucket, LoRA or not).

An eager decode step of a Llama-8B-shaped model launches about a thousand kernels from Python,
plus two Triton launches per fused linear for LoRA; at decode batch sizes the GPU finishes them
faster than Python issues them. A graph replays the whole step with one launch.

What a replay needs fixed, and how it gets it:
- Shapes. Decodes are padded up to a batch bucket, and attention reads every KV slot up to a
  length bucket (rows that are not decoding, and positions past each sequence's length, are
  masked). Padding rows carry token 0 at position 0 of the KV cache's scratch slot and no adapter.
- Addresses. Inputs are copied into static device buffers each step; the model's weights, the
  KV cache and the adapter pools never move; the kernels' address tables are held here too.
- No host syncs inside the step. The LoRA metadata is built with fixed-shape ops
  (`group_tokens(validate=False)`), and the Triton backend runs every targeted module of the pool
  (slots that skip a module hold zeros there, which add nothing).

Steps that prefill run eagerly. With `capture=False` the same fixed-shape step runs without a
graph, which is how the CPU tests check it against the eager forward.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from mintvcs.serve.kv_cache import KVCache
from mintvcs.serve.model import LoraBatch, Model, StepBatch
from mintvcs.serve.slots import AdapterPools

log = logging.getLogger("mintvcs.serve")

# Decode batch sizes a graph is captured for: small powers of two, then every multiple of 8
# (a step pads at most 7 rows once batches are large).
_SMALL_BATCHES = (1, 2, 4)
_BATCH_STEP = 8
# The shortest attention length bucket; longer ones double up to the KV cache's max_len.
_MIN_LENGTH = 64


def batch_buckets(max_batch: int) -> list[int]:
    """The padded decode batch sizes up to max_batch (max_batch itself is always one)."""
    sizes = [n for n in _SMALL_BATCHES if n < max_batch]
    sizes += range(_BATCH_STEP, max_batch, _BATCH_STEP)
    return sorted({*sizes, max_batch})


def length_buckets(max_len: int) -> list[int]:
    """The attention lengths a step is padded to: powers of two from 64, and max_len."""
    sizes = []
    n = _MIN_LENGTH
    while n < max_len:
        sizes.append(n)
        n *= 2
    return [*sizes, max_len]


def _bucket(value: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= value)


class DecodeGraphs:
    """Fixed-shape decode steps, captured as CUDA graphs on first use (or run directly with capture=False)."""

    def __init__(
        self,
        model: Model,
        kv: KVCache,
        pools: AdapterPools | None,
        *,
        max_batch: int,
        backend: str = "auto",
        capture: bool | None = None,
    ) -> None:
        if kv.scratch_slot is None:
            raise ValueError("DecodeGraphs needs a KV cache with a scratch slot (scratch=True)")
        self.model = model
        self.kv = kv
        self.pools = pools
        self.backend = backend
        self.capture = model.device.type == "cuda" if capture is None else capture
        self.batches = batch_buckets(max_batch)
        self.lengths = length_buckets(kv.max_len)
        self.rows = kv.num_slots + 1  # every KV slot and the scratch slot
        device = model.device
        m = self.max_batch = self.batches[-1]
        # One int64 buffer for a step's inputs, so each step is one host-to-device copy:
        # token ids, positions, KV slots, adapter slots [max_batch each], then each KV row's length.
        self._layout = {"ids": 0, "positions": m, "kv": 2 * m, "lora": 3 * m, "lengths": 4 * m}
        size = 4 * m + self.rows
        self._inputs = torch.zeros(size, dtype=torch.long, device=device)
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()
        self._positions = torch.arange(self.kv.max_len, device=device)
        self._graphs: dict[tuple[int, int, bool], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self._keep: list[object] = []  # tensors the captured kernels address (see _capture)
        self.capture_seconds = 0.0
        self.steps = 0  # decode steps run here
        self.failure: str | None = None  # why capturing failed (graphs are then off)

    def fits(self, num_decodes: int, max_length: int) -> bool:
        """Whether a decode step of this size can run here (else it runs eagerly)."""
        return (
            self.failure is None
            and 0 < num_decodes <= self.max_batch
            and max_length <= self.kv.max_len
        )

    def run(self, decodes: Sequence[tuple[int, int, int, int]], lora: bool) -> torch.Tensor | None:
        """Logits [len(decodes), vocab] of a decode-only step of (token, position, kv_slot, lora_slot).

        The tensor is this graph's output buffer: read it before the next run. None: a capture
        failed, so graphs are off from now on (`failure` says why) and the caller runs eagerly.
        """
        n = len(decodes)
        max_length = max(d[1] for d in decodes) + 1
        if not self.fits(n, max_length):
            raise ValueError(f"a step of {n} decodes up to length {max_length} does not fit")
        batch = _bucket(n, self.batches)
        length = _bucket(max_length, self.lengths)
        self._stage(decodes, batch)
        self.steps += 1
        key = (batch, length, lora)
        if not self.capture:
            return self._step(*key)[:n]
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(key)
            except Exception as err:  # a driver or an op that cannot be captured: serve eagerly
                self.failure = f"{type(err).__name__}: {err}"
                log.warning("CUDA graph capture failed; decoding eagerly from now on: %s", err)
                return None
        graph, out = entry
        graph.replay()
        return out[:n]

    def _stage(self, decodes: Sequence[tuple[int, int, int, int]], batch: int) -> None:
        """Write the step's inputs, padding rows included, into the static input buffer."""
        at, host, n = self._layout, self._host_np, len(decodes)
        tokens, positions, kv_slots, lora_slots = zip(*decodes, strict=True)
        scratch = self.kv.scratch_slot
        for name, values, pad in (
            ("ids", tokens, 0),
            ("positions", positions, 0),
            ("kv", kv_slots, scratch),
            ("lora", lora_slots, -1),
        ):
            host[at[name] : at[name] + n] = values
            host[at[name] + n : at[name] + batch] = pad
        lengths = host[at["lengths"] :]
        lengths[:] = 1  # rows not decoding attend to position 0 only: no all-masked (NaN) rows
        lengths[list(kv_slots)] = [p + 1 for p in positions]
        # Non-blocking from pinned memory: the previous step's logits were read on the host
        # (a sync), so no copy from this buffer is still in flight when it is rewritten.
        self._inputs.copy_(self._host, non_blocking=True)

    def _step(self, batch: int, length: int, lora: bool) -> torch.Tensor:
        """The step itself, on the static buffers: fixed shapes, no host syncs."""
        at, inputs = self._layout, self._inputs
        kv_slots = inputs[at["kv"] : at["kv"] + batch]
        lengths = inputs[at["lengths"] : at["lengths"] + self.rows]
        mask = (self._positions[:length].unsqueeze(0) < lengths.unsqueeze(1)).view(
            self.rows, 1, 1, length
        )
        token_lora_slots = inputs[at["lora"] : at["lora"] + batch].to(torch.int32)
        step = StepBatch(
            input_ids=inputs[at["ids"] : at["ids"] + batch],
            positions=inputs[at["positions"] : at["positions"] + batch],
            token_kv_slots=kv_slots,
            token_lora_slots=token_lora_slots,
            num_decode=batch,
            decode_kv_slots=kv_slots,
            decode_mask=mask,
            max_decode_len=length,
            prefills=[],
            logits_index=self._positions[:batch],
            decode_span=(0, self.rows),
            decode_rows=kv_slots,
        )
        adapters = None
        if lora and self.pools is not None:
            from mintvcs.kernels import group_tokens

            pools = self.pools
            adapters = LoraBatch(
                token_slots=group_tokens(token_lora_slots, pools.num_slots, validate=False),
                a=pools.a,
                b=pools.b,
                scales=pools.scales,
                ranks=pools.ranks,
                modules=frozenset(pools.targets),
                backend=self.backend,
                packed=pools.packed,
            )
        return self.model.forward(step, self.kv, adapters)

    def _capture(self, key: tuple[int, int, bool]) -> tuple[Any, torch.Tensor]:
        """Warm up, then capture the step of `key` into a graph sharing one memory pool."""
        started = time.perf_counter()
        device = self.model.device
        # Warm-up on a side stream, as torch asks before a capture: it compiles the Triton
        # kernels, creates cuBLAS workspaces and fills the kernels' address tables. It runs the
        # real inputs, so its KV writes are the ones the replay makes.
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream(device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter loader keeps copying into slots on its own thread meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._step(*key)
        # The Triton wrapper caches its per-pool address tables and may drop them when its cache
        # fills; the graph baked in their addresses, so they must live as long as it does.
        from mintvcs.kernels import triton_ops

        self._keep.append(tuple(triton_ops.address_tables()))
        self.capture_seconds += time.perf_counter() - started
        log.info(
            "captured a CUDA graph for %d decodes up to length %d%s in %.2f s",
            key[0],
            key[1],
            " with adapters" if key[2] else "",
            time.perf_counter() - started,
        )
        return graph, out

    @property
    def captured(self) -> int:
        """How many graphs have been captured."""
        return len(self._graphs)
