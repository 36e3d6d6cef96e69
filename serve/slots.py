"""Adapter residency: device slot pools per targeted linear, a host LRU of decoded revisions, background loads.

Three tiers: the store on disk (an `AdapterSource`), a host-memory LRU of `HostAdapter`s bounded in bytes,
and N device slots. A slot is keyed by revision id (a commit id from the store), never by a ref name.
Each running request holds a reference on its slot; only slots with no references and no pin are
evicted, least recently used first. Loads run on a background thread and the scheduler never waits for
them: a request whose revision is not ready stays queued while the rest of the batch keeps decoding.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mintvcs.errors import MintError
from mintvcs.kernels import Backend
from mintvcs.serve.adapters import (
    AdapterRefused,
    AdapterSource,
    AdapterWeights,
    BaseFingerprint,
    HostAdapter,
    PackedImage,
    refuse_other_base,
)
from mintvcs.serve.loader import ModelConfig
from mintvcs.serve.model import LORA_GROUPS, LORA_MODULES, LoraBatch
from mintvcs.serve.threads import use_one_intraop_thread

# How long a load failure that is not a refusal (a disk error, say) is reported before a retry.
_RETRY_AFTER_S = 2.0


def _detached(err: BaseException) -> BaseException:
    """A copy of `err` without its traceback or chained errors (its __init__ is not run again:
    AdapterRefused's takes other arguments than it keeps)."""
    clone = type(err).__new__(type(err))
    clone.args = err.args
    clone.__dict__.update(err.__dict__)
    return clone


# Revisions whose refusal is remembered (the oldest forgotten first): an eval that names each
# commit of a long run by id must not grow this without bound.
_REMEMBERED_FAILURES = 4096
# Stand-in factors for sizing an image: image_numel reads only which modules a revision adapts.
_NO_FACTORS = (torch.empty(0), torch.empty(0))


class ResidencyError(MintError):
    """A residency request that cannot be honoured (e.g. pinning more revisions than there are slots)."""


class ResidencyClosed(ResidencyError):
    """The residency is closing or closed (the engine stops): a load asked for now, or still
    queued when close() ran, will never be made."""


def _transpose_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src.T (with dtype conversion); numpy's strided copy where it can."""
    if dst.dtype == src.dtype and src.dtype in (torch.float32, torch.float16):
        # 392 small transposes per revision: numpy's copy has less per-call overhead and a faster
        # strided loop (measured 10 ms against 15 ms for torch's copy_ on a 33.5 MB revision).
        np.copyto(dst.numpy(), src.numpy().T)
    else:
        dst.copy_(src.t())


class AdapterPools:
    """Device tensors `[slots, max_rank, in]` / `[slots, out, max_rank]` per targeted linear of every layer."""

    def __init__(
        self,
        config: ModelConfig,
        num_slots: int,
        max_rank: int,
        targets: tuple[str, ...] = LORA_MODULES,
        *,
        dtype: torch.dtype,
        device: torch.device,
        packed: bool = False,
    ) -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots ({num_slots}) and max_rank ({max_rank}) must be positive")
        unknown = set(targets) - set(LORA_MODULES)
        if unknown:
            raise ValueError(f"unknown LoRA targets {sorted(unknown)}; choose from {LORA_MODULES}")
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.targets = tuple(m for m in LORA_MODULES if m in targets)
        # The most tensor bytes a servable revision can hold: max_rank on every target, in the
        # widest dtype (F64). A store revision claiming more is refused before it is decoded,
        # since its manifest alone would size the buffers (a tiny zstd frame can claim GiBs).
        self.max_revision_bytes = (
            8
            * config.num_hidden_layers
            * sum(max_rank * sum(config.linear_shape(m)) for m in self.targets)
        )
        self.device = device
        self.dtype = dtype
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        for _ in range(config.num_hidden_layers):
            a_layer, b_layer = {}, {}
            # With packed factors the forward never reads the per-module pools: skip them (memory,
            # and a hot swap then copies each factor once).
            for module in () if packed else self.targets:
                out_f, in_f = config.linear_shape(module)
                a_layer[module] = torch.zeros(num_slots, max_rank, in_f, dtype=dtype, device=device)
                b_layer[module] = torch.zeros(
                    num_slots, out_f, max_rank, dtype=dtype, device=device
                )
            self.a.append(a_layer)
            self.b.append(b_layer)
        # For the torch backend: each fused layer's factors side by side instead (kernels.PackedLora),
        # so that a step does one shrink matmul per fused layer rather than one per module.
        self.packed: list[dict[str, Any]] | None = None
        self._packed_modules: dict[str, tuple[str, ...]] = {}
        if packed:
            from mintvcs.kernels.ops import new_packed

            self.packed = []
            for _ in range(config.num_hidden_layers):
                layer_packed = {}
                for name, modules in LORA_GROUPS:
                    widths = [config.linear_shape(m)[0] for m in modules]
                    in_f = config.linear_shape(modules[0])[1]
                    columns, col = [], 0
                    for m, w in zip(modules, widths, strict=True):
                        if m in self.targets:
                            columns.append((col, w))
                        col += w
                    if not columns:
                        continue
                    self._packed_modules[name] = tuple(m for m in modules if m in self.targets)
                    layer_packed[name] = new_packed(
                        num_slots, in_f, col, columns, max_rank, dtype=dtype, device=device
                    )
                self.packed.append(layer_packed)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self.slot_modules: list[frozenset[str]] = [frozenset()] * num_slots
        # (layer, module) -> rank of the non-zero B each slot holds, so that stale B columns get cleared.
        self._written: list[dict[tuple[int, str], int]] = [{} for _ in range(num_slots)]

    @property
    def nbytes(self) -> int:
        """Device bytes of all pools."""
        packed = sum(p.nbytes for layer in self.packed or [] for p in layer.values())
        return packed + sum(
            t.numel() * t.element_size() for layer in (*self.a, *self.b) for t in layer.values()
        )

    # -- host copies ------------------------------------------------------------------------------
    def _image_groups(self, host: HostAdapter) -> list[list[tuple[str, tuple[bool, ...]]]]:
        """Per layer: each fused group `host` adapts, with which of its slices it adapts."""
        assert self.packed is not None
        return [
            [
                (name, flags)
                for name in layer
                if any(flags := tuple((i, m) in host.weights for m in self._packed_modules[name]))
            ]
            for i, layer in enumerate(self.packed)
        ]

    def image_numel(self, host: HostAdapter) -> int:
        """Elements of `host`'s packed image (see `stage`); 0 without packed pools."""
        if self.packed is None:
            return 0
        r, total = host.rank, 0
        for layer, groups in zip(self.packed, self._image_groups(host), strict=True):
            for name, flags in groups:
                packed = layer[name]
                total += packed.a.shape[1] * len(flags) * r
                total += sum(b.shape[2] * r for b, f in zip(packed.b, flags, strict=True) if f)
        return total

    def new_image(self, numel: int) -> torch.Tensor:
        """A zeroed flat host buffer for a packed image of `numel` elements (see `stage`)."""
        if self.packed is None:
            raise ResidencyError("new_image needs packed pools (the CPU torch backend)")
        dtype = self.packed[0][next(iter(self.packed[0]))].a.dtype
        # zeros, not empty: padding must read as zero; and the pages are touched here, so a
        # caller can pay for them on another thread ahead of time.
        return torch.zeros(numel, dtype=dtype)

    def stage(self, host: HostAdapter, image: torch.Tensor | None = None) -> HostAdapter:
        """The host copy the cache keeps: factors in one flat buffer, in the slots' memory order.

        Packed pools (CPU): per adapted group, A^T [in, P*r] and B^T [r, width] at the revision's
        rank r, the image of a slot's content with the rank padding left out, so `write` copies
        whole tensors (r = max_rank) or one strided block per tensor. `image` is a zeroed buffer
        of `image_numel(host)` elements (from `new_image`); allocated here when None. On CUDA:
        one pinned buffer, so the slot copy runs asynchronously. Otherwise `host` as it is.
        """
        if self.packed is None:
            if self.device.type != "cuda":
                return host
            total = sum(a.numel() + b.numel() for a, b in host.weights.values())
            buffer = torch.empty(total, dtype=self.dtype, pin_memory=True)
            pinned, offset = {}, 0
            for key, factors in host.weights.items():
                copies = []
                for t in factors:
                    view = buffer[offset : offset + t.numel()].view(t.shape)
                    view.copy_(t)
                    offset += t.numel()
                    copies.append(view)
                pinned[key] = (copies[0], copies[1])
            return HostAdapter(host.revision, host.rank, host.scale, host.modules, pinned, buffer)
        numel = self.image_numel(host)
        if image is None:
            image = self.new_image(numel)
        if image.numel() != numel:
            raise ValueError(f"image holds {image.numel()} elements, this revision {numel}")
        r, offset = host.rank, 0

        def take(*shape: int) -> torch.Tensor:
            nonlocal offset
            n = math.prod(shape)
            view = image[offset : offset + n].view(shape)
            offset += n
            return view

        views: PackedImage = []
        weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, (pools, groups) in enumerate(
            zip(self.packed, self._image_groups(host), strict=True)
        ):
            layer_views = {}
            for name, flags in groups:
                packed = pools[name]
                img_a = take(packed.a.shape[1], len(flags) * r)
                img_b: list[torch.Tensor | None] = []
                for i, (module, b_pool, adapted) in enumerate(
                    zip(self._packed_modules[name], packed.b, flags, strict=True)
                ):
                    if not adapted:
                        img_b.append(None)  # its A^T columns stay zero
                        continue
                    a, b = host.weights[(layer, module)]
                    rm = a.shape[0]  # this module's own rank; past it the image stays zero
                    dst_a = img_a[:, i * r : i * r + rm]  # [in, rm], rows strided by P*r
                    dst_b = take(r, b_pool.shape[2])
                    _transpose_into(dst_a, a)
                    _transpose_into(dst_b[:rm], b)
                    img_b.append(dst_b)
                    weights[(layer, module)] = (dst_a.t(), dst_b[:rm].t())
                layer_views[name] = (img_a, tuple(img_b))
            views.append(layer_views)
        return HostAdapter(
            host.revision, host.rank, host.scale, host.modules, weights, image, views
        )

    def write(self, slot: int, host: HostAdapter) -> None:
        """Copy a host adapter into `slot`, zeroing every B column an earlier occupant left non-zero."""
        if self.packed is not None and host.packed is not None:
            self._write_image(slot, host.packed, host.rank)
            self._finish_write(slot, host)
            return
        if self.packed is not None:
            from mintvcs.kernels.ops import pack_slot

            # pack_slot zeroes the whole slot first: nothing of an earlier occupant survives.
            for layer, groups in enumerate(self.packed):
                for name, packed in groups.items():
                    modules = self._packed_modules[name]
                    pack_slot(packed, slot, [host.weights.get((layer, m)) for m in modules])
            self._finish_write(slot, host)
            return
        old = self._written[slot]
        for key, extent in old.items():
            if key not in host.weights:
                # A module the new revision does not target must contribute nothing.
                layer, module = key
                self.b[layer][module][slot, :, :extent].zero_()
        non_blocking = self.device.type == "cuda"
        written: dict[tuple[int, str], int] = {}
        for key, (a, b) in host.weights.items():
            layer, module = key
            r = a.shape[0]
            self.a[layer][module][slot, :r].copy_(a, non_blocking=non_blocking)
            self.b[layer][module][slot, :, :r].copy_(b, non_blocking=non_blocking)
            # Kernels read B up to the slot's rank; clear what lies past this module's own rank.
            stale = max(old.get(key, 0), host.rank)
            if stale > r:
                self.b[layer][module][slot, :, r:stale].zero_()
            written[key] = r  # columns that may now be non-zero
        self._written[slot] = written
        self._finish_write(slot, host)

    def _write_image(self, slot: int, image: PackedImage, r: int) -> None:
        """Copy a staged image into packed `slot`; every element of the slot is written."""
        assert self.packed is not None
        for pools, staged in zip(self.packed, image, strict=True):
            for name, packed in pools.items():
                a, rank = packed.a[slot], packed.rank  # [in, P*R]
                entry = staged.get(name)
                if entry is None:  # a group the revision does not adapt
                    a.zero_()
                    for b in packed.b:
                        b[slot].zero_()
                    continue
                img_a, img_b = entry
                if r == rank:
                    a.copy_(img_a)  # the common case: one contiguous copy
                else:
                    # Each slice's r columns of A^T, then zeros up to the padded rank R.
                    in_f, parts = a.shape[0], len(img_b)
                    slices = a.view(in_f, parts, rank)
                    slices[:, :, :r].copy_(img_a.view(in_f, parts, r))
                    slices[:, :, r:].zero_()
                for b, src in zip(packed.b, img_b, strict=True):
                    if src is None:
                        b[slot].zero_()
                        continue
                    b[slot, :r].copy_(src)
                    if r < rank:
                        b[slot, r:].zero_()

    def _finish_write(self, slot: int, host: HostAdapter) -> None:
        self.scales[slot] = host.scale
        self.ranks[slot] = host.rank
        self.slot_modules[slot] = host.modules

    def release(self, slot: int) -> None:
        """Mark `slot` empty (rank 0), so no token can read its stale factors."""
        self.ranks[slot] = 0
        self.slot_modules[slot] = frozenset()

    def batch(
        self, token_slots: torch.Tensor, slots: set[int], backend: Backend = "auto"
    ) -> LoraBatch | None:
        """The LoraBatch of one step, or None when no token uses an adapter."""
        modules: frozenset[str] = (
            frozenset().union(*(self.slot_modules[s] for s in slots)) if slots else frozenset()
        )
        if not modules:
            return None
        from mintvcs.kernels import group_tokens

        groups = group_tokens(token_slots, self.num_slots, validate=False)
        return LoraBatch(
            token_slots=groups,
            a=self.a,
            b=self.b,
            scales=self.scales,
            ranks=self.ranks,
            modules=modules,
            backend=backend,
            packed=self.packed,  # exists only when the engine runs the torch backend
        )


class HostCache:
    """An LRU of decoded revisions bounded in bytes; an entry larger than the bound is not kept."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, HostAdapter] = OrderedDict()
        self.nbytes = 0
        self.evictions = 0
        self._lock = threading.Lock()

    def get(self, revision: str) -> HostAdapter | None:
        """The cached adapter (now most recently used), or None."""
        with self._lock:
            entry = self._entries.get(revision)
            if entry is not None:
                self._entries.move_to_end(revision)
            return entry

    def put(self, host: HostAdapter) -> None:
        """Insert, evicting least recently used entries to stay within max_bytes."""
        size = host.nbytes
        with self._lock:
            if host.revision in self._entries:
                self.nbytes -= self._entries.pop(host.revision).nbytes
            if size > self.max_bytes:
                return
            while self._entries and self.nbytes + size > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self.nbytes -= old.nbytes
                self.evictions += 1
            self._entries[host.revision] = host
            self.nbytes += size

    def __contains__(self, revision: object) -> bool:
        with self._lock:
            return revision in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def revisions(self) -> list[str]:
        """Cached revision ids, least recently used first."""
        with self._lock:
            return list(self._entries)


@dataclass
class Slot:
    """One device slot's bookkeeping."""

    index: int
    revision: str | None = None
    state: str = "free"  # free | loading | ready
    refs: int = 0
    last_used: float = 0.0
    future: Future[int | None] | None = None
    # A revision that found every slot busy: this slot takes no new references until it is
    # idle, so that the revision gets it in bounded time (see Residency._drain_for).
    draining_for: str | None = None


@dataclass
class ResidencyStats:
    """Counters for /metrics."""

    slot_hits: int = 0
    slot_misses: int = 0
    host_hits: int = 0
    store_loads: int = 0
    evictions: int = 0
    loads_failed: int = 0
    load_seconds_total: float = 0.0
    load_count: int = 0
    last_load_seconds: float = 0.0
    recent_load_seconds: list[float] = field(default_factory=list)


class Residency:
    """Which revision sits in which slot; loads in the background; LRU eviction of idle, unpinned slots."""

    def __init__(
        self,
        pools: AdapterPools,
        source: AdapterSource | None,
        prepare: Callable[[AdapterWeights], HostAdapter],
        *,
        host_cache_bytes: int,
        on_change: Callable[[], None] | None = None,
        base_fingerprint: BaseFingerprint = None,
    ) -> None:
        self.pools = pools
        self.source = source
        self.prepare = prepare
        self.base_fingerprint = base_fingerprint  # the resident base's (prepare checks it too)
        self.host = HostCache(host_cache_bytes)
        self.slots = [Slot(i) for i in range(pools.num_slots)]
        self.stats = ResidencyStats()
        self._by_revision: dict[str, Slot] = {}
        self._pinned: set[str] = set()
        self._failures: dict[str, tuple[float, BaseException]] = {}
        self._host_loads: dict[str, Future[int | None]] = {}
        self._lock = threading.RLock()
        self._on_change = on_change or (lambda: None)
        # Loads run torch on one thread each: see mintvcs.serve.threads.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="mintvcs-adapter-load",
            initializer=use_one_intraop_thread,
        )
        # A zeroed, already faulted-in host buffer for the next cold load's image, made on a
        # helper thread (see _host_adapter); first sized for a full-rank, all-target revision.
        self._alloc: ThreadPoolExecutor | None = None
        self._closing = False
        self._spare: Future[torch.Tensor] | None = None
        if pools.packed is not None:
            self._alloc = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="mintvcs-adapter-alloc",
                initializer=use_one_intraop_thread,
            )
            full = HostAdapter(
                "", pools.max_rank, 1.0, frozenset(pools.targets),
                {(i, m): _NO_FACTORS for i in range(len(pools.packed)) for m in pools.targets},
            )  # fmt: skip
            self._spare = self._alloc.submit(pools.new_image, pools.image_numel(full))
        self._stream: Any = (
            torch.cuda.Stream(device=pools.device) if pools.device.type == "cuda" else None
        )

    def close(self) -> None:
        """Stop the loader thread (the load in progress finishes; queued ones fail with ResidencyClosed)."""
        with self._lock:
            self._closing = True
        self._executor.shutdown(wait=True, cancel_futures=True)
        # A load cancelled before it started never settles the future warm() handed out:
        # `await engine.warm(...)` queued behind another load would wait for ever.
        with self._lock:
            waiting = [s.future for s in self.slots if s.future is not None]
            waiting += self._host_loads.values()
        closed = ResidencyClosed("the engine was closed before this revision was loaded")
        for future in waiting:
            with contextlib.suppress(InvalidStateError):  # settled meanwhile
                future.set_exception(closed)
        if self._alloc is not None:
            self._alloc.shutdown(wait=True, cancel_futures=True)

    # -- the scheduler's side -------------------------------------------------------------------
    def acquire(self, revision: str, *, waited: bool = False) -> int | None:
        """Take a reference on `revision`'s ready slot; else start its load if a slot can be freed, return None.

        `waited`: the request asked before and got None. Each admission counts once, when it
        gets its slot: a slot miss if it had to wait for it, else a hit.
        """
        with self._lock:
            self._raise_failure(revision)
            slot = self._by_revision.get(revision)
            if slot is not None and slot.state == "ready":
                if slot.draining_for is not None:
                    return None  # an older request's revision waits for this slot
                slot.refs += 1
                slot.last_used = time.monotonic()
                if waited:
                    self.stats.slot_misses += 1
                else:
                    self.stats.slot_hits += 1
                return slot.index
            if slot is None and self._start_load(revision) is None:
                self._drain_for(revision)
            return None

    def release(self, index: int) -> None:
        """Drop one reference on a slot; at zero it becomes evictable (unless pinned)."""
        with self._lock:
            slot = self.slots[index]
            if slot.refs <= 0:
                raise ResidencyError(f"slot {index} released more often than acquired")
            slot.refs -= 1
            slot.last_used = time.monotonic()
            if slot.refs == 0:
                # Idle now, and still reserved for the revision it drained for: that one's next
                # acquire loads into it (the scheduler asks in FIFO order). A pin taken since
                # then waits for the next slot that falls idle, not this one.
                self._load_waiting_pins()
        self._on_change()

    def undrain(self, revision: str) -> None:
        """Stop reserving a slot for `revision`: no request waits for it any more (cancelled)."""
        with self._lock:
            for slot in self.slots:
                if slot.draining_for == revision:
                    # Else the slot takes no new references, for nobody; the next waiter of
                    # another revision drains one again when it asks.
                    slot.draining_for = None
                    if slot.refs == 0:  # idle and reserved until now: a waiting pin may take it
                        self._load_waiting_pins()

    def failure(self, revision: str) -> BaseException | None:
        """The error of revision's last failed load, if it is still reported."""
        with self._lock:
            try:
                self._raise_failure(revision)
            except BaseException as err:
                return err
            return None

    def _remember_failure(self, revision: str, err: BaseException) -> None:
        """Count a failed load and keep why `revision` failed (under the lock): the error
        without its traceback, whose frames would hold the decoded adapter and the loader's
        locals. A pin asked for it is dropped: nothing is resident to hold, and a pin left
        behind would count against later pins though no slot shows it."""
        self.stats.loads_failed += 1
        self._pinned.discard(revision)
        for slot in self.slots:  # its waiting requests now fail: a reservation would be for nobody
            if slot.draining_for == revision:
                slot.draining_for = None
        self._failures.pop(revision, None)
        self._failures[revision] = (time.monotonic(), _detached(err))
        while len(self._failures) > _REMEMBERED_FAILURES:
            del self._failures[next(iter(self._failures))]

    def _raise_failure(self, revision: str) -> None:
        entry = self._failures.get(revision)
        if entry is None:
            return
        when, err = entry
        # Refusals depend only on the revision's content (ids are commit ids): they are final.
        if isinstance(err, AdapterRefused) or time.monotonic() - when < _RETRY_AFTER_S:
            # A fresh copy per request: raising the stored one would grow its traceback by each
            # request's frames, and keep them (and what they hold) alive for good.
            raise _detached(err)
        del self._failures[revision]

    # -- warm, pin, inspect ---------------------------------------------------------------------
    def warm(self, revision: str, *, pin: bool = False) -> Future[int | None]:
        """Load `revision` into a slot if one can be freed, else into the host cache; the future gives the slot."""
        with self._lock:
            if self._closing:
                # As a load queued when close() ran: the server is stopping (a 503), not a
                # conflict with this revision (ResidencyError's 409).
                raise ResidencyClosed("the engine was closed; nothing can be loaded")
            if pin:
                # Every pin counts, in a slot or not yet: one pinned while the slots were busy
                # takes a slot once loaded, and all slots pinned would starve other revisions.
                if revision not in self._pinned and len(self._pinned) + 1 >= len(self.slots):
                    raise ResidencyError(
                        f"cannot pin {revision[:12]}: that would leave no slot for other revisions; "
                        "add adapter slots (the server's --max-loras) or unpin one"
                    )
                self._pinned.add(revision)
            self._failures.pop(revision, None)
            slot = self._by_revision.get(revision)
            if slot is not None:
                if slot.state == "ready":
                    done: Future[int | None] = Future()
                    done.set_result(slot.index)
                    return done
                assert slot.future is not None
                return slot.future
            started = self._start_load(revision)
            if started is not None:
                return started
            pending = self._host_loads.get(revision)
            if pending is None:
                # Our own future, not the executor's: close() fails it with ResidencyClosed
                # rather than cancelling it (a CancelledError would read as the awaiting
                # task's own cancellation).
                pending = self._host_loads[revision] = Future()
                self._executor.submit(self._load_host_only, revision, pending)
            return pending

    def unpin(self, revision: str) -> bool:
        """Let `revision`'s slot be evicted again once idle; False if it was not pinned."""
        with self._lock:
            pinned = revision in self._pinned
            self._pinned.discard(revision)
            return pinned

    def pinned(self) -> list[str]:
        """Every pinned revision, in a slot or waiting for one."""
        with self._lock:
            return sorted(self._pinned)

    def _load_waiting_pins(self) -> None:
        """Start loading pinned revisions that hold no slot (pinned while every slot was busy)
        into idle ones; under the lock."""
        if self._closing:  # a release after close(): nothing is loaded any more
            return
        for revision in sorted(self._pinned - self._by_revision.keys()):
            future = self._start_load(revision)
            if future is None:
                return  # no slot can be freed: the next release tries again
            # A failure is remembered (and unpins it); nobody waits on this future.
            future.add_done_callback(lambda f: f.exception())

    def snapshot(self) -> list[dict[str, Any]]:
        """One dict per slot: index, revision, state, refs, pinned, idle seconds."""
        now = time.monotonic()
        with self._lock:
            return [
                {
                    "slot": s.index,
                    "revision": s.revision,
                    "state": s.state,
                    "refs": s.refs,
                    "pinned": s.revision in self._pinned,
                    "rank": int(self.pools.ranks[s.index]) if s.state == "ready" else 0,
                    "idle_s": round(now - s.last_used, 3)
                    if s.state == "ready" and not s.refs
                    else 0.0,
                }
                for s in self.slots
            ]

    def slot_of(self, revision: str) -> int | None:
        """The ready slot holding `revision`, or None."""
        with self._lock:
            slot = self._by_revision.get(revision)
            return slot.index if slot is not None and slot.state == "ready" else None

    # -- loading --------------------------------------------------------------------------------
    def _drain_for(self, revision: str) -> None:
        """Every slot is busy: reserve the busy slot with the fewest references for `revision`.

        Otherwise a revision in use by a steady stream of requests would keep its slot busy for
        ever, and a request for another revision, passed over at each step, would wait for ever.
        One slot drains at a time (the oldest waiting revision's), so the others keep serving.
        """
        if any(s.draining_for is not None for s in self.slots):
            return
        busy = [
            s
            for s in self.slots
            if s.state == "ready" and s.refs > 0 and s.revision not in self._pinned
        ]
        if busy:
            min(busy, key=lambda s: (s.refs, s.last_used)).draining_for = revision

    def _victim(self, revision: str) -> Slot | None:
        """The slot to load `revision` into: a free one, else the least recently used idle,
        unpinned one that is not reserved for another revision (drained for it)."""
        free = [s for s in self.slots if s.state == "free"]
        if free:
            return free[0]
        idle = [
            s
            for s in self.slots
            if s.state == "ready"
            and s.refs == 0
            and s.revision not in self._pinned
            and s.draining_for in (None, revision)
        ]
        return min(idle, key=lambda s: s.last_used) if idle else None

    def _start_load(self, revision: str) -> Future[int | None] | None:
        if self._closing:
            # The loader is shut down: a submit would fail with the executor's RuntimeError
            # and leave the slot "loading" for good.
            raise ResidencyClosed("the engine was closed; nothing can be loaded")
        if self.source is None:
            raise ResidencyError(
                "this engine has no adapter source; pass source= to serve revisions"
            )
        victim = self._victim(revision)
        if victim is None:
            return None
        for slot in self.slots:  # a slot draining for this revision need drain no more
            if slot.draining_for == revision:
                slot.draining_for = None
        if victim.revision is not None:
            self.stats.evictions += 1
            del self._by_revision[victim.revision]
        self.pools.release(victim.index)
        victim.revision, victim.state, victim.refs = revision, "loading", 0
        future: Future[int | None] = Future()
        victim.future = future
        self._by_revision[revision] = victim
        self._executor.submit(self._load_into, victim, revision, time.perf_counter(), future)
        return future

    def _host_adapter(self, revision: str) -> HostAdapter:
        host = self.host.get(revision)
        if host is not None:
            self.stats.host_hits += 1
            return host
        assert self.source is not None
        try:
            weights = self.source.load(revision, max_bytes=self.pools.max_revision_bytes)
        except AdapterRefused as err:  # too large, and maybe for another base: that is the cause
            refuse_other_base(revision, err.base_fingerprint, self.base_fingerprint)
            raise
        prepared = self.prepare(weights)
        host = self.pools.stage(prepared, self._take_spare(prepared))
        # The one NaN/Inf check, over the staged buffer: it covers dtype conversion and folded scales.
        host.check_finite()
        self.stats.store_loads += 1
        self.host.put(host)
        return host

    def _take_spare(self, host: HostAdapter) -> torch.Tensor | None:
        """The spare image buffer if it fits `host`; starts making the next one either way.

        Fresh memory is the dearest part of a cold load: page faults cost ~60 ms for a 33 MB
        image on a busy VM, against ~80 ms for the store's decode. Revisions of one deployment
        share their shape, so a spare sized like the last image is almost always the right one;
        it is faulted in on the helper thread while the loader is idle or decoding.
        """
        if self._alloc is None:
            return None
        numel = self.pools.image_numel(host)
        spare, self._spare = self._spare, None
        image = None
        if spare is not None and not spare.cancelled() and spare.exception() is None:
            ready = spare.result()  # usually done long ago; else it finishes sooner than a new one
            if ready.numel() == numel:
                image = ready
        with self._lock:  # close() may have shut the helper down
            if not self._closing:
                self._spare = self._alloc.submit(self.pools.new_image, numel)
        return image

    def _load_host_only(self, revision: str, future: Future[int | None]) -> None:
        try:
            host = self._host_adapter(revision)
        except BaseException as err:
            with self._lock:
                self._remember_failure(revision, err)
            future.set_exception(err)
            return
        finally:
            with self._lock:
                self._host_loads.pop(revision, None)
        if revision not in self.host:  # not the revision's fault: no failure remembered
            future.set_exception(
                ResidencyError(
                    f"every adapter slot is busy and the host cache ({self.host.max_bytes} "
                    f"bytes) cannot hold {revision[:12]} ({host.nbytes} bytes): nothing was warmed"
                )
            )
            return
        future.set_result(None)

    def _load_into(
        self, slot: Slot, revision: str, started: float, future: Future[int | None]
    ) -> None:
        try:
            host = self._host_adapter(revision)
            if self._stream is not None:
                # A side stream: the copy overlaps decode steps running on the default stream.
                # It starts after what that stream already holds, the eviction's release() of
                # this slot included: otherwise that rank-0 write could land after ours, and the
                # slot would silently apply nothing.
                self._stream.wait_stream(torch.cuda.default_stream(self.pools.device))
                with torch.cuda.stream(self._stream):
                    self.pools.write(slot.index, host)
                self._stream.synchronize()
            else:
                self.pools.write(slot.index, host)
        except BaseException as err:
            with self._lock:
                self._remember_failure(revision, err)
                self._by_revision.pop(revision, None)
                slot.revision, slot.state, slot.future = None, "free", None
            future.set_exception(err)
            self._on_change()
            return
        elapsed = time.perf_counter() - started
        with self._lock:
            slot.state = "ready"
            slot.last_used = time.monotonic()
            slot.future = None
            s = self.stats
            s.load_count += 1
            s.load_seconds_total += elapsed
            s.last_load_seconds = elapsed
            s.recent_load_seconds = [*s.recent_load_seconds[-63:], elapsed]
        future.set_result(slot.index)
        self._on_change()
