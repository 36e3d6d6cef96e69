"""Decode steps replayed from CUDA graphs: one capture per (batch bucket, length bucket, LoRA or not).

An eager decode step of a Llama-8B-shaped model launches about a thousand kernels from Python,
plus two Triton launches per fused linear for LoRA; at decode batch sizes the GPU finishes them
faster than Python issues them. A graph replays the whole step with one launch.

What a replay needs fixed, and how it gets it:
- Shapes. Decodes are padded up to a batch bucket B that also covers their highest KV slot, and
  attention reads KV slots 0..B (slot 0 is the cache's scratch slot) up to a length bucket; rows
  that are not decoding, and positions past each sequence's length, are masked. KV slots are
  handed out lowest first, so B stays close to the batch. Padding rows carry token 0 at
  position 0 of the scratch slot and no adapter.
- Addresses. Inputs are copied into static device buffers each step; the model's weights, the
  KV cache and the adapter pools never move; the kernels' address tables are held here too.
- No host syncs inside the step. The LoRA metadata is built with fixed-shape ops
  (`group_tokens(validate=False)`), and the Triton backend runs every targeted module of the pool
  (slots that skip a module hold zeros there, which add nothing).

Steps that prefill run eagerly. With `capture=False` the same fixed-shape step runs without a
graph, which is how the CPU tests check it against the eager forward.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from mintvcs.kernels import Backend
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
        backend: Backend = "auto",
        capture: bool | None = None,
    ) -> None:
        if kv.scratch_slot != 0:
            raise ValueError("DecodeGraphs needs a KV cache with a scratch slot (scratch=True)")
        self.model = model
        self.kv = kv
        self.pools = pools
        self.backend = backend
        self.capture = model.device.type == "cuda" if capture is None else capture
        # A bucket covers both the decodes and the highest KV slot in use: at most every slot.
        self.batches = batch_buckets(kv.num_slots)
        self.lengths = length_buckets(kv.max_len)
        device = model.device
        m = self.max_batch = self.batches[-1]
        # One int64 buffer for a step's inputs, so each step is one host-to-device copy:
        # token ids, positions, KV slots, adapter slots [max_batch each], then the length of
        # each KV slot 0..max_batch (what the step's attention reads).
        self._layout = {"ids": 0, "positions": m, "kv": 2 * m, "lora": 3 * m, "lengths": 4 * m}
        size = 5 * m + 1
        self._inputs = torch.zeros(size, dtype=torch.long, device=device)
        self._host = torch.zeros(size, dtype=torch.long, pin_memory=device.type == "cuda")
        self._host_np = self._host.numpy()
        self._copied: Any = None  # a CUDA event: the last copy out of _host has finished
        self._positions = torch.arange(max(kv.max_len, m + 1), device=device)
        # Every graph writes its logits here: one buffer, not one per graph.
        self._logits = torch.empty(m, model.config.vocab_size, device=device)
        self._graphs: dict[tuple[int, int, bool], Any] = {}
        self._pool: Any = None
        self._keep: list[object] = []  # tensors the captured kernels address (see _capture)
        self.capture_seconds = 0.0
        self.steps = 0  # decode steps run here
        self.failure: str | None = None  # why capturing failed (graphs are then off)

    def plan(self, decodes: Sequence[tuple[int, int, int, int]]) -> tuple[int, int] | None:
        """(batch bucket, length bucket) of a decode-only step, or None when it must run eagerly."""
        if self.failure is not None or not decodes:
            return None
        span = max(len(decodes), max(d[2] for d in decodes))  # KV slots 1..span are read
        length = max(d[1] for d in decodes) + 1
        if span > self.max_batch or length > self.kv.max_len:
            return None
        return _bucket(span, self.batches), _bucket(length, self.lengths)

    def run(self, decodes: Sequence[tuple[int, int, int, int]], lora: bool) -> torch.Tensor | None:
        """Logits [len(decodes), vocab] of a decode-only step of (token, position, kv_slot, lora_slot).

        The tensor is a view of a buffer the next run overwrites: read it before then. None: the
        step does not fit (plan), or a capture failed and graphs are off (`failure` says why);
        the caller runs the step eagerly.
        """
        planned = self.plan(decodes)
        if planned is None:
            return None
        batch, length = planned
        n = len(decodes)
        self._stage(decodes, batch)
        self.steps += 1
        key = (batch, length, lora)
        if not self.capture:
            return self._step(*key)[:n]
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture_or_give_up(key)
            if graph is None:
                return None
        graph.replay()
        return self._logits[:n]

    def _stage(self, decodes: Sequence[tuple[int, int, int, int]], batch: int) -> None:
        """Write the step's inputs, padding rows included, into the static input buffer."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the pinned buffer
        at, host, n = self._layout, self._host_np, len(decodes)
        tokens, positions, kv_slots, lora_slots = zip(*decodes, strict=True)
        for name, values, pad in (
            ("ids", tokens, 0),
            ("positions", positions, 0),
            ("kv", kv_slots, 0),  # the scratch slot
            ("lora", lora_slots, -1),
        ):
            host[at[name] : at[name] + n] = values
            host[at[name] + n : at[name] + batch] = pad
        lengths = host[at["lengths"] :]
        lengths[:] = 1  # rows not decoding attend to position 0 only: no all-masked (NaN) rows
        lengths[list(kv_slots)] = [p + 1 for p in positions]
        self._inputs.copy_(self._host, non_blocking=True)
        if self._inputs.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _step(self, batch: int, length: int, lora: bool) -> torch.Tensor:
        """The step itself, on the static buffers: fixed shapes, no host syncs."""
        at, inputs = self._layout, self._inputs
        rows = batch + 1  # KV slots 0 (scratch) .. batch
        kv_slots = inputs[at["kv"] : at["kv"] + batch]
        lengths = inputs[at["lengths"] : at["lengths"] + rows]
        mask = (self._positions[:length].unsqueeze(0) < lengths.unsqueeze(1)).view(
            rows, 1, 1, length
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
            decode_span=(0, rows),
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

    def _capture_or_give_up(self, key: tuple[int, int, bool]) -> Any:
        """The graph of `key`, captured now; None after a failure, which turns graphs off for good."""
        device = self.model.device
        stream = None
        try:
            stream = torch.cuda.current_stream(device)
            with torch.cuda.device(device):
                graph = self._graphs[key] = self._capture(key)
            return graph
        except Exception as err:  # a driver or an op that cannot be captured: serve eagerly
            # An invalidated capture raises from capture_end before torch restores the stream:
            # put the thread back on its own stream, or every later eager step would run on the
            # capture's side stream, out of order with the adapter loader's.
            if stream is not None:
                torch.cuda.set_stream(stream)
            cause = err.__context__ or err.__cause__
            self.failure = f"{type(err).__name__}: {err}" + (
                f" (after {type(cause).__name__}: {cause})" if cause else ""
            )
            log.warning("CUDA graph capture failed; decoding eagerly from now on: %s", self.failure)
            self._graphs.clear()
            self._keep.clear()
            self._pool = None
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
            return None

    def _capture(self, key: tuple[int, int, bool]) -> Any:
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
        batch = key[0]
        # thread_local: the adapter loader keeps copying into slots on its own thread meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[:batch].copy_(self._step(*key))
        # The Triton wrapper caches its per-pool address tables and may drop them when its cache
        # fills; the graph baked in their addresses, so they must live as long as it does.
        from mintvcs.kernels import triton_ops

        self._keep.append(tuple(triton_ops.address_tables()))
        elapsed = time.perf_counter() - started
        self.capture_seconds += elapsed
        log.info(
            "captured a CUDA graph for %d decodes up to length %d%s in %.2f s",
            key[0],
            key[1],
            " with adapters" if key[2] else "",
            elapsed,
        )
        return graph

    @property
    def captured(self) -> int:
        """How many graphs have been captured."""
        return len(self._graphs)
