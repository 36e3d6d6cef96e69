"""The engine: one resident base, adapter slots, and a step loop on its own thread behind an async API."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import logging
import operator
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from collections.abc import Sequence as Seq
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeAlias, TypeVar, get_args

import torch

from mintvcs.errors import MintError
from mintvcs.kernels import Backend
from mintvcs.progress import progress_bar
from mintvcs.serve.adapters import AdapterSource, prepare_adapter
from mintvcs.serve.graphs import DecodeGraphs
from mintvcs.serve.loader import (
    ModelConfig,
    load_tokenizer,
    missing_tokenizer_hint,
    read_config,
    read_special_tokens,
    safetensors_files,
    token_text,
)
from mintvcs.serve.memory import keep_freed_memory
from mintvcs.serve.model import LORA_MODULES, Model, check_max_len
from mintvcs.serve.sampling import (
    IncrementalDetokenizer,
    SamplingParams,
    StructuredOutput,
    TokenLogprobs,
)
from mintvcs.serve.scheduler import Scheduler, Sequence, TokenEvent
from mintvcs.serve.slots import AdapterPools, Residency, ResidencyClosed
from mintvcs.serve.structured import Grammars
from mintvcs.serve.threads import available_cpus, one_intraop_thread, set_intraop_threads

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# One failed step can be one bad batch; this many in a row is an engine that cannot compute
# (a sticky CUDA error, say): health checks then report it so a load balancer stops sending.
UNHEALTHY_AFTER_FAILED_STEPS = 3


log = logging.getLogger("mintvcs.serve")


class EngineError(MintError):
    """The engine cannot take this request or configuration."""


class InvalidRequest(EngineError):
    """A request the engine refuses before queueing it (empty prompt, too long, bad token id)."""


class EngineClosed(EngineError):
    """The engine was closed; no request can be submitted."""


class EngineOverloaded(EngineError):
    """The request's choices would take the sequences waiting to start past
    EngineConfig.max_waiting; retry later."""

    reason = "overloaded"


class SlowConsumer(EngineError):
    """A streamed request's reader fell more than its unread-events limit behind; it was cancelled."""

    reason = "slow_consumer"


@dataclass(frozen=True)
class EngineConfig:
    """Engine sizing; every memory the engine allocates is bounded by these numbers."""

    device: str = "auto"  # "auto" = cuda when available, else cpu
    dtype: str | None = None  # None: fp32 on CPU; on CUDA fp16 for an fp16 base, else bf16
    max_batch_size: int = 32  # running sequences = KV cache slots
    max_model_len: int | None = None  # prompt + output; None = min(2048, max_position_embeddings)
    max_num_batched_tokens: int = 4096  # prompt tokens prefilled per step; longer ones are chunked
    adapter_slots: int = 8
    max_lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_MODULES
    host_cache_bytes: int = 2 << 30
    kernel_backend: Backend = "auto"
    check_base_fingerprint: bool = True
    # Decode-only steps replay from CUDA graphs on a GPU (serve/graphs.py); False = always eager.
    cuda_graphs: bool = True
    # Threads of the step thread's torch team on CPU; None = the caller's torch count, capped by
    # the CPUs this process may use (affinity and cgroup quota: threads.available_cpus).
    cpu_threads: int | None = None
    # Sequences (a request's choices: n per prompt) that may wait to start (queued, not yet in
    # the batch), counted so because each takes a KV slot; a request that would take them past
    # this is refused with EngineOverloaded. None = no bound, as vLLM: a client then waits
    # instead of being told.
    max_waiting: int | None = None
    # Finished sequences' KV slots keep their keys and values, and a prompt that starts with
    # the same tokens for the same revision copies them (serve/prefix_cache.py). False = every
    # prompt is computed in full, as before.
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.dtype, torch.dtype):  # vLLM takes one: kept as its name
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise EngineError(f"dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise EngineError(f"device {self.device!r} must be 'auto', 'cpu' or 'cuda[:N]'")
        for name in ("max_batch_size", "max_num_batched_tokens", "adapter_slots", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise EngineError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("cpu_threads", "max_waiting"):  # None: chosen for you, no bound
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EngineError(f"{name} must be at least 1 or None, got {value}")
        # 0 used to mean the default silently, and a negative one failed deep in the model.
        if self.max_model_len is not None and self.max_model_len < 2:
            raise EngineError(
                f"max_model_len must be at least 2 (one prompt token and one generated) or "
                f"None for the base's own limit, got {self.max_model_len}"
            )
        if self.host_cache_bytes < 0:
            raise EngineError(
                f"host_cache_bytes must be at least 0 (0: no host cache), got {self.host_cache_bytes}"
            )
        backends = get_args(Backend)
        if self.kernel_backend not in backends:  # else every adapter step failed, logged only
            raise EngineError(
                f"kernel_backend {self.kernel_backend!r} is not one of {', '.join(backends)}"
            )
        bad = set(self.lora_targets) - set(LORA_MODULES)
        if bad:
            raise EngineError(
                f"lora_targets {sorted(bad)} are not linears we adapt; choose from {LORA_MODULES}"
            )

    def torch_device(self) -> torch.device:
        """The device this config resolves to."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
                raise EngineError(
                    f"device {self.device!r} asked for, but torch {torch.__version__} ({build}) "
                    "sees no CUDA device; use --device cpu or auto"
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise EngineError(
                    f"device {self.device!r} asked for, but only "
                    f"{torch.cuda.device_count()} CUDA device(s) are visible"
                )
        return device

    def torch_dtype(self, device: torch.device, stored: str | None = None) -> torch.dtype:
        """The compute dtype: the configured one, else fp32 on CPU; on CUDA fp16 for a base
        stored in fp16 (`stored`, config.json's torch_dtype), else bf16."""
        if self.dtype is not None:
            return _DTYPES[self.dtype]
        if device.type != "cuda":
            return torch.float32
        # As vLLM's "auto": an fp16 model keeps fp16, whose 10 mantissa bits bf16 would cut to 7
        # (about 9x the logit error); fp32 and bf16 bases compute in bf16.
        return torch.float16 if stored == "float16" else torch.bfloat16


def _warn_if_tokenizer_outgrows(directory: Path, tokenizer: Any, model: ModelConfig) -> None:
    """One warning when the tokenizer has ids past the model's vocabulary: every prompt that
    encodes to one of them is refused (400), and structured outputs with it: a mismatched
    tokenizer, most likely, better named at start-up than on each request."""
    ids = tokenizer.get_vocab(with_added_tokens=True).values()
    top = max(ids, default=-1)
    if top >= model.vocab_size:
        past = sum(1 for i in ids if i >= model.vocab_size)
        log.warning(
            "%s/tokenizer.json has %d token id(s) outside the model's vocabulary [0, %d) "
            "(config.json's vocab_size), up to %d: prompts that encode to them, and structured "
            "outputs, will be refused (400); is it the tokenizer of this model?",
            directory,
            past,
            model.vocab_size,
            top,
        )


def _uses_graphs(config: EngineConfig, device: torch.device) -> bool:
    """Whether the engine captures CUDA graphs (which take a scratch KV slot)."""
    # Graphs need the Triton backend: the torch one reads slot segments on the host (a sync).
    return device.type == "cuda" and config.cuda_graphs and config.kernel_backend != "torch"


def _kv_cache_bytes(
    model: ModelConfig, config: EngineConfig, max_len: int, dtype: torch.dtype, graphs: bool
) -> int:
    """The bytes of the engine's KV cache: keys and values of every layer, for each slot."""
    slots = config.max_batch_size + int(graphs)
    return slots * 2 * model.num_hidden_layers * max_len * model.kv_size * dtype.itemsize


def _device_memory(device: torch.device) -> int:
    """The bytes of memory `device` has in all (the machine's RAM for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _kv_cache_too_large(
    config: EngineConfig, max_len: int, wanted: int, device: torch.device, *, allocated: bool
) -> EngineError:
    """The error for a KV cache that does not fit (more than the device has, or, `allocated`,
    one the allocator refused): its size, and the options that set it."""
    fits = (
        "which could not be allocated"
        if allocated
        else f"more than the {_device_memory(device) / 2**30:.1f} GiB it has"
    )
    return EngineError(
        f"the KV cache for {config.max_batch_size} sequences of {max_len} tokens needs {wanted} "
        f"bytes ({wanted / 2**30:.1f} GiB) of {device} memory, {fits}; lower max_batch_size "
        "(--max-batch-size) or max_model_len (--max-model-len)"
    )


@dataclass(frozen=True)
class Completion:
    """A finished request, for the blocking helpers."""

    text: str
    token_ids: list[int]
    finish_reason: str
    revision: str | None
    prompt_tokens: int
    # When the request's SamplingParams asked for them: one per generated token / prompt token.
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


# What a request's sink posts to its stream's queue: one event or error, or several at once.
_Posted: TypeAlias = TokenEvent | BaseException | list[TokenEvent | BaseException]


def _cancel_abandoned(seq: Sequence) -> None:
    """Cancel the request of a stream that was dropped unfinished."""
    # Only a flag the step loop reads at its next step: the garbage collector may run this on
    # any thread, inside any lock (the engine's included), so it takes none and wakes nobody.
    seq.cancel()


class _Backlog:
    """Events posted to the streams of one submit_many() call and not yet read, and their limit.

    A reader that stops reading (a client that keeps its socket open and reads nothing) would
    otherwise have every event of its request kept until the request ends, and its connection
    for ever: past the limit its requests are cancelled and their queued events dropped.
    """

    def __init__(self, engine: Engine, limit: int, on_overflow: Callable[[], None] | None) -> None:
        self.engine = engine
        self.limit = limit
        self.on_overflow = on_overflow
        self.unread = 0
        self.overflowed = False
        self.queues: list[_EventQueue] = []

    def overflow(self) -> None:
        """Cancel every request of the call, drop what waits unread, and tell on_overflow."""
        self.overflowed = True
        error = SlowConsumer(
            f"the stream's reader fell more than {self.limit} events behind; the request "
            "was cancelled"
        )
        for events in self.queues:
            self.engine.cancel(events.request_id)
            while not events.empty():
                events.get_nowait()
            asyncio.Queue.put_nowait(events, error)
        self.unread = 0
        if self.on_overflow is not None:
            self.on_overflow()


class _EventQueue(asyncio.Queue[_Posted]):
    """A request's event queue whose unread events count against its call's _Backlog."""

    def __init__(self, backlog: _Backlog) -> None:
        super().__init__()
        self.backlog = backlog
        self.request_id = -1
        backlog.queues.append(self)

    def put_nowait(self, item: _Posted) -> None:
        """Queue `item` (on the loop); past the backlog's limit, overflow instead."""
        backlog = self.backlog
        if backlog.overflowed:  # cancelled: what its step thread still posts is dropped
            return
        backlog.unread += len(item) if isinstance(item, list) else 1
        if backlog.unread > backlog.limit:
            backlog.overflow()
            return
        super().put_nowait(item)

    def taken(self, item: _Posted) -> None:
        """`item` was read: it no longer counts as unread."""
        if not self.backlog.overflowed:
            self.backlog.unread -= len(item) if isinstance(item, list) else 1


class RequestStream:
    """The async iterator of one request's TokenEvents; cancel() (or leaving `async with`) frees it."""

    def __init__(self, engine: Engine, seq: Sequence, events: asyncio.Queue[_Posted]) -> None:
        self._engine = engine
        self._seq = seq
        self._events = events
        self._pending: deque[TokenEvent | BaseException] = deque()
        self._done = False
        self.request_id = seq.request_id
        self.revision = seq.revision
        self.prompt_tokens = len(seq.prompt_ids)
        # A stream dropped unfinished (a `break` out of `async for` over it, or never iterated)
        # would keep its KV slot and adapter reference until the request ran to its end, as
        # nothing else refers to it. Like an async generator's finalizer, dropping it cancels.
        # Registered last: a stream whose construction failed has no request to cancel.
        self._abandoned = weakref.finalize(self, _cancel_abandoned, seq)
        self._abandoned.atexit = False

    def _finish(self) -> None:
        self._done = True
        self._abandoned.detach()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        if self._pending:
            item = self._pending.popleft()
        else:
            try:
                posted = await self._events.get()
            except asyncio.CancelledError:
                # The consumer went away (client disconnect): free the sequence and its slot ref.
                self.cancel()
                raise
            if isinstance(self._events, _EventQueue):
                self._events.taken(posted)
            if isinstance(posted, list):
                self._pending.extend(posted)
                item = self._pending.popleft()
            else:
                item = posted
        if isinstance(item, BaseException):
            self._finish()
            raise item
        if item.finish_reason is not None:
            self._finish()
        return item

    def cancel(self) -> None:
        """Stop generating; the engine frees the KV slot and adapter reference at its next step."""
        if not self._done:
            self._finish()
            self._engine.cancel(self.request_id)

    async def aclose(self) -> None:
        """Cancel if unfinished."""
        self.cancel()

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()


class LoopMailbox:
    """Token events bound for one event loop, handed over with one wakeup per batch, not per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, target: asyncio.Queue[Any], item: object) -> bool:
        """Queue item for the loop (from any thread); False when the loop is closed."""
        # A decode step posts one event per sequence: waking the loop for each would make the
        # HTTP thread take the GIL dozens of times per step, stalling the step thread.
        if self.closed():
            return False
        with self._lock:
            self._items.append((target, item))
            if self._scheduled:
                return True
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
                self._items.clear()
            return False
        return True

    def closed(self) -> bool:
        """Whether the loop is closed; its undelivered items are dropped then."""
        # Checked on each post: a delivery scheduled before the loop closed never runs, so
        # _scheduled stays set and call_soon_threadsafe is never tried again to say so.
        if not self.loop.is_closed():
            return False
        with self._lock:
            self._items.clear()
        return True

    def _deliver(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for target, item in items:
            target.put_nowait(item)


T = TypeVar("T")


def _own_future(shared: Future[T]) -> Future[T]:
    """A future of the caller's own that settles as `shared` does: callers of one load share it,
    and one caller cancelling (a client gone from `await engine.warm(...)`) must not cancel the
    load for the others."""
    mine: Future[T] = Future()

    def settle(done: Future[T]) -> None:
        with contextlib.suppress(InvalidStateError):  # the caller cancelled its own
            if done.cancelled():
                mine.cancel()
            elif (err := done.exception()) is not None:
                mine.set_exception(err)
            else:
                mine.set_result(done.result())

    shared.add_done_callback(settle)
    return mine


def _check_source(source: AdapterSource) -> None:
    """Refuse a source whose load() cannot take max_bytes=: every request would fail on it."""
    load = getattr(source, "load", None)
    if not callable(load) or not callable(getattr(source, "resolve", None)):
        raise EngineError(
            f"{type(source).__name__} is not an AdapterSource: it needs resolve(spec) -> id "
            "and load(id, *, max_bytes=None) -> AdapterWeights"
        )
    try:
        params = inspect.signature(load).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): the call will tell
        return
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if not any(
        p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == "max_bytes" and p.kind in named)
        for p in params
    ):
        names = ", ".join(p.name for p in params)
        raise EngineError(
            f"{type(source).__name__}.load({names}) takes no max_bytes: the "
            "engine calls load(id, max_bytes=N) and a source refuses a revision of more than N "
            'bytes of tensors with AdapterRefused(id, "too_large", ...); see AdapterSource'
        )


def _token_ids(prompt: object) -> list[int]:
    """A prompt of token ids as a list; TypeError for anything but integers (numpy's too)."""
    # bytes are a sequence of ints, and int() truncates floats: both gave a silent wrong prompt.
    if isinstance(prompt, bytes | bytearray | memoryview) or not isinstance(prompt, Iterable):
        raise TypeError(
            f"a prompt is a str or a list of int token ids, not {type(prompt).__name__}"
        )
    ids = []
    for item in list(prompt):  # once: a generator's items are read once
        try:
            ids.append(operator.index(item))  # ints, numpy's and 0-d tensors' included
        except TypeError:  # a float, or a row of a 2-D array (a tokenizer's return_tensors)
            raise TypeError(
                f"a prompt is a str or a list of int token ids; it holds {item!r:.40} "
                f"({type(item).__name__})"
            ) from None
    return ids


def _request_parts(
    request: object,
) -> tuple[str | Seq[int], str | None, SamplingParams | None]:
    """One (prompt, revision, params) of submit_many/start_many; TypeError for anything else."""
    if not isinstance(request, tuple | list) or len(request) != 3:
        raise TypeError(
            "each request is a (prompt, revision, SamplingParams or None) tuple, not "
            f"{request!r:.60}; for one prompt use generate() or submit()"
        )
    prompt, revision, params = request
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"a revision is a str or None, not {type(revision).__name__}")
    return prompt, revision, params


def _link_forks(seqs: Seq[Sequence]) -> None:
    """Mark runs of requests with one prompt, revision, prompt-logprobs ask and cache salt (`n`
    choices) as forks of the run's first: admitted together, they prefill the prompt once."""
    parent: Sequence | None = None
    for seq in seqs:
        if (
            parent is not None
            and seq.prompt_ids == parent.prompt_ids
            and seq.cache_owner == parent.cache_owner  # its revision, and its cache salt
            and seq.params.prompt_logprobs == parent.params.prompt_logprobs
        ):
            seq.fork_of = parent
        else:
            parent = seq


class _LoopSink:
    """A request's sink that posts its events to an event loop (held back until the end without `stream`)."""

    def __init__(
        self,
        engine: Engine,
        mailbox: LoopMailbox,
        events: asyncio.Queue[_Posted],
        stream: bool,
    ) -> None:
        self.engine = engine
        self.mailbox = mailbox
        self.events = events
        self.stream = stream
        self.request_id = -1
        self.held: list[TokenEvent | BaseException] = []  # touched by the step thread only

    def __call__(self, item: TokenEvent | BaseException) -> None:
        if self.mailbox.closed():  # nobody listens any more: free its slots now
            self.held.clear()
            self.engine.cancel(self.request_id)
            return
        # A caller that waits for the whole text gains nothing from a loop wakeup per step,
        # which is Python work competing with the step thread for the GIL and the CPUs.
        if (
            not self.stream
            and isinstance(item, TokenEvent)
            and item.finish_reason is None
            and item.index > 1
        ):
            self.held.append(item)
            return
        posted: _Posted = item
        if self.held:
            posted = [*self.held, item]
            self.held.clear()
        if not self.mailbox.post(
            self.events, posted
        ):  # the loop is closed: nobody listens any more
            self.engine.cancel(self.request_id)


def _release(residency: Residency, source: AdapterSource | None) -> None:
    """Stop the loader threads and close the source (a StoreSource's open pack files)."""
    residency.close()
    close_source = getattr(source, "close", None)
    if callable(close_source):
        close_source()


def _step_loop(
    engine_ref: weakref.ref[Engine],
    wake: threading.Event,
    residency: Residency,
    source: AdapterSource | None,
    threads: int,
) -> None:
    """The step thread: runs steps until the engine is closed, or collected unclosed.

    It holds its engine only for one step at a time, never while it sleeps: an engine that
    nobody refers to any more (a notebook cell run again without close()) is then collected,
    with its model, KV cache and slot pools, and this thread ends instead of stepping for ever.
    A stream or a future of a request still running holds the engine, so it is never collected
    under a caller that waits for one.
    """
    set_intraop_threads(threads)
    while True:
        engine = engine_ref()
        if engine is None:
            break
        if engine._closed:
            return  # close() releases the rest
        wait = engine._step()
        del engine  # before sleeping: the sleep must not keep it alive
        if wait is not None:
            wake.wait(wait)
    # Collected without close(). Released here rather than in a weakref finalizer, which the
    # garbage collector may run on any thread (a loader thread itself, which close() joins)
    # and inside any lock.
    _release(residency, source)


class Engine:
    """A resident base model serving many adapter revisions through slot pools and continuous batching."""

    def __init__(
        self,
        base: Path | str | Model,
        config: EngineConfig | None = None,
        *,
        source: AdapterSource | None = None,
        base_fingerprint: str | None = None,
        start: bool = True,
    ) -> None:
        self.config = config = config or EngineConfig()
        if source is not None:
            _check_source(source)
        # The step thread computes with the caller's thread count (at most the CPUs it may use);
        # everything here runs on one thread, so that the caller keeps no OpenMP team that would
        # slow the step thread's.
        self._threads = config.cpu_threads or min(torch.get_num_threads(), available_cpus())
        on_cpu = (base.device if isinstance(base, Model) else config.torch_device()).type == "cpu"
        if on_cpu and config.cpu_threads is not None and config.cpu_threads > available_cpus():
            log.warning(
                "cpu_threads (--cpu-threads) %d is more than the %d CPUs this process may use: "
                "each step's threads wait for one another, and a descheduled one stalls the "
                "step for all",
                config.cpu_threads,
                available_cpus(),
            )
        with one_intraop_thread() if on_cpu else contextlib.nullcontext():
            self._build(base, config, source, base_fingerprint)
        if on_cpu:  # after loading, whose temporaries need not stay: serving's steps reuse theirs
            keep_freed_memory()
        # As vLLM: the tokenizer's eos_token ends a sequence too (a ChatML fine-tune names
        # <|im_end|> there while config.json keeps the base's id), beside the configs' ids.
        self._eos = frozenset([*self.model.config.eos_token_ids, *self._tokenizer_eos()])
        self._ids = itertools.count(1)
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._seqs: dict[int, Sequence] = {}
        self._lock = threading.Lock()
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = (
            weakref.WeakKeyDictionary()
        )
        self._closed = False
        self._grammars: Grammars | None = None  # built at the first structured output
        # Its own lock: building it indexes the whole vocabulary (up to a second), which must
        # not hold up submit() on the event loop.
        self._grammars_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.started_at = time.time()
        if start:
            self.start()

    # -- lifecycle ------------------------------------------------------------------------------
    def _tokenizer_eos(self) -> tuple[int, ...]:
        """The id of the tokenizer's eos_token (tokenizer_config.json, or special_tokens_map.json
        as transformers reads it), which vLLM stops on; none without a tokenizer or such a token."""
        if self.tokenizer is None or self.base_dir is None:
            return ()
        text = token_text(read_special_tokens(self.base_dir).get("eos_token"))
        token_id = self.tokenizer.token_to_id(text) if text is not None else None
        return () if token_id is None else (int(token_id),)

    def _build(
        self,
        base: Path | str | Model,
        config: EngineConfig,
        source: AdapterSource | None,
        base_fingerprint: str | None,
    ) -> None:
        """Load the base (or take the given one) and set up the KV cache, slot pools and scheduler."""
        accepted: tuple[str, ...] = ()
        if isinstance(base, Model):
            # A model built in memory (benchmarks build random bases on the GPU): no tokenizer, token ids only.
            self.base_dir: Path | None = None
            self.model = base
            self.max_model_len = base.max_len
            self.tokenizer = None
        else:
            self.base_dir = Path(base)
            device = config.torch_device()
            model_config = read_config(self.base_dir)
            dtype = config.torch_dtype(device, model_config.stored_dtype)
            limit = model_config.trained_positions
            if config.max_model_len is not None and config.max_model_len > limit:
                raise EngineError(
                    f"max_model_len {config.max_model_len} is beyond the {limit} positions "
                    f"{self.base_dir} was trained for (max_position_embeddings and RoPE "
                    f"scaling); past them RoPE extrapolates and the output degrades: set "
                    f"max_model_len <= {limit}"
                )
            self.max_model_len = config.max_model_len or min(2048, limit)
            # What the configuration alone refuses, refused before the weights are read (a
            # large base takes minutes) and before RoPE tables of max_model_len rows are built.
            check_max_len(model_config, self.max_model_len)
            graphs = _uses_graphs(config, device)
            kv_bytes = _kv_cache_bytes(model_config, config, self.max_model_len, dtype, graphs)
            if kv_bytes > _device_memory(device):
                raise _kv_cache_too_large(
                    config, self.max_model_len, kv_bytes, device, allocated=False
                )
            self.tokenizer = load_tokenizer(self.base_dir)
            total = sum(f.stat().st_size for f in safetensors_files(self.base_dir))
            with progress_bar(total, "loading base") as progress:
                self.model = Model.from_dir(
                    self.base_dir,
                    dtype=dtype,
                    device=device,
                    max_len=self.max_model_len,
                    progress=progress,
                    config=model_config,
                )
            if self.tokenizer is not None:
                _warn_if_tokenizer_outgrows(self.base_dir, self.tokenizer, model_config)
            if self.tokenizer is None:
                log.warning(
                    "%s has no tokenizer.json%s: text prompts will be refused (400), and only "
                    "/v1/completions with a prompt of token ids is served",
                    self.base_dir,
                    missing_tokenizer_hint(self.base_dir),
                )
            if base_fingerprint is None and config.check_base_fingerprint:
                from mintvcs.base import fingerprints

                accepted = fingerprints(self.base_dir)
                base_fingerprint = accepted[0]
        self.base_fingerprint = base_fingerprint
        # Every fingerprint a revision of this base may carry: the current one, then those
        # older versions recorded (their repositories stay valid).
        self.base_fingerprints: tuple[str, ...] = accepted or (
            (base_fingerprint,) if base_fingerprint else ()
        )
        device, dtype = self.model.device, self.model.dtype
        self.source = source
        graphs = _uses_graphs(config, device)
        try:
            self.kv = self.model.new_kv_cache(
                config.max_batch_size, self.max_model_len, scratch=graphs
            )
        except (RuntimeError, MemoryError):  # torch's allocators say so in RuntimeErrors
            wanted = _kv_cache_bytes(self.model.config, config, self.max_model_len, dtype, graphs)
            raise _kv_cache_too_large(
                config, self.max_model_len, wanted, device, allocated=True
            ) from None
        self.pools = AdapterPools(
            self.model.config,
            config.adapter_slots,
            config.max_lora_rank,
            config.lora_targets,
            dtype=dtype,
            device=device,
            # The torch backend on CPU runs fused layers from packed factors (see AdapterPools).
            packed=device.type == "cpu" and config.kernel_backend != "triton",
        )
        self._wake = threading.Event()
        self.residency = Residency(
            self.pools,
            source,
            # Validation only: the residency stages the factors into the slots' memory order
            # (and pinned memory on CUDA) and runs the NaN/Inf check once, over the staged
            # buffer. No method of the engine: nothing the residency holds (its loader threads
            # neither) may keep an engine that nobody refers to any more alive.
            functools.partial(
                prepare_adapter,
                config=self.model.config,
                max_rank=config.max_lora_rank,
                targets=self.pools.targets,
                base_fingerprint=self.base_fingerprints,
                dtype=self.model.dtype,
                check_finite=False,
            ),
            host_cache_bytes=config.host_cache_bytes,
            on_change=self._wake.set,
            base_fingerprint=self.base_fingerprints,
        )
        self.scheduler = Scheduler(
            self.model,
            self.kv,
            self.residency,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kernel_backend=config.kernel_backend,
            prefix_caching=config.prefix_caching,
            graphs=DecodeGraphs(
                self.model,
                self.kv,
                self.pools,
                backend=config.kernel_backend,
            )
            if graphs
            else None,
        )

    def start(self) -> None:
        """Start the step loop thread."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=_step_loop,
                args=(weakref.ref(self), self._wake, self.residency, self.source, self._threads),
                name="mintvcs-engine",
                daemon=True,
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the step loop and the loader; pending requests get EngineClosed."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        _release(self.residency, self.source)
        err = EngineClosed("the engine was closed")
        sched = self.scheduler
        for seq in [*sched.waiting, *sched.prefilling, *sched.running]:
            seq.sink(err)
        while not self._inbox.empty():
            self._inbox.get().sink(err)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _step(self) -> float | None:
        """One turn of the step loop: None when it did work, else how long to wait for a wakeup."""
        sched = self.scheduler
        # Cleared before the inbox is looked at, not after: a submit (put, then set) landing
        # between the look and the clear would have its wakeup cleared unseen, and wait for
        # the idle timeout. Cleared first, it leaves the event set and the wait returns at once.
        self._wake.clear()
        if not self._inbox.empty():
            # Under the lock that _enqueue counts `waiting` under: a request in neither the
            # inbox nor the scheduler's queue would let one more in than max_waiting allows.
            with self._lock:
                while not self._inbox.empty():
                    sched.add(self._inbox.get_nowait())
        worked = sched.step()
        # The requests that ended in this step, as the scheduler lists them: not a look at
        # every live request per step (a backlog of thousands).
        done, sched.done = sched.done, []
        with self._lock:
            for seq in done:
                self._seqs.pop(seq.request_id, None)
        if worked:
            return None
        # Nothing runnable: sleep until a submit, a cancel or a finished load wakes us.
        return 0.05 if sched.has_work else 1.0

    # -- requests -------------------------------------------------------------------------------
    def encode(self, prompt: str, *, special_tokens: bool = True) -> list[int]:
        """Token ids of `prompt` with the checkpoint's tokenizer (and its BOS, unless `special_tokens=False`)."""
        if self.tokenizer is None:
            raise InvalidRequest(
                "the base model has no tokenizer.json, so text prompts cannot be encoded"
            )
        ids: list[int] = self.tokenizer.encode(prompt, add_special_tokens=special_tokens).ids
        return ids

    def resolve(self, spec: str) -> str:
        """The revision id a ref or name means now (through the adapter source)."""
        if self.source is None:
            raise EngineError("this engine has no adapter source; it serves the base only")
        return self.source.resolve(spec)

    def _new_sequence(
        self,
        prompt: str | Seq[int],
        revision: str | None,
        params: SamplingParams | None,
        sink: Any,
        compiled: Mapping[StructuredOutput, Any] | None = None,
    ) -> Sequence:
        if self._closed:
            raise EngineClosed("the engine was closed")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise TypeError(
                f"params must be a SamplingParams or None, not {type(params).__name__}: "
                f"SamplingParams(**{{...}}) makes one from a dict"
            )
        ids = self.encode(prompt) if isinstance(prompt, str) else _token_ids(prompt)
        if not ids:
            raise InvalidRequest("the prompt is empty; send at least one token")
        vocab = self.model.config.vocab_size
        for what, named in (
            ("token id", ids),
            ("stop token id", params.stop_token_ids),
            ("logit_bias token id", [t for t, _ in params.logit_bias]),
            ("allowed token id", params.allowed_token_ids or ()),
        ):
            bad = [t for t in named if not 0 <= t < vocab]
            if bad:
                raise InvalidRequest(f"{what} {bad[0]} is outside the vocabulary [0, {vocab})")
        allowed = params.allowed_token_ids
        if allowed is not None and params.min_tokens:
            ending = frozenset(params.stop_token_ids) | (
                frozenset() if params.ignore_eos else self._eos
            )
            if ending.issuperset(allowed):
                # Every token would be masked until min_tokens: nothing left to pick.
                raise InvalidRequest(
                    "allowed_token_ids holds only tokens that end the output, which min_tokens "
                    "bars until it is reached"
                )
        if len(ids) >= self.max_model_len:
            raise InvalidRequest(
                f"the prompt has {len(ids)} tokens; this engine's max_model_len is {self.max_model_len}"
            )
        if revision is not None:
            if self.source is None:
                raise EngineError(
                    "this engine has no adapter source; send revision=None for the base"
                )
            known = self.residency.failure(revision)
            if known is not None:
                raise known
        grammar = matcher = renew = None
        if params.structured is not None:
            spec = params.structured
            grammars = self.grammars()
            grammar = (compiled or {}).get(spec)
            if grammar is None:
                grammar = grammars.compile(spec)
            matcher = grammar.deep_copy()
            renew = functools.partial(grammars.renew, spec)
        seq = Sequence(
            request_id=next(self._ids),
            prompt_ids=ids,
            params=params,
            revision=revision,
            sink=sink,
            detok=IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens
            ),
            eos_ids=self._eos,
            max_len=self.max_model_len,
            generator=None if params.greedy else params.generator(),
            grammar=grammar,
            matcher=matcher,
            renew_grammar=renew,
        )
        with self._lock:
            self._seqs[seq.request_id] = seq
        return seq

    def cached_grammar(self, spec: StructuredOutput) -> Any:
        """`spec`'s compiled matcher if it is cached (Grammars.cached: no compile, no wait),
        else None; InvalidStructuredOutput if it failed to compile lately."""
        with self._grammars_lock:
            grammars = self._grammars
        return None if grammars is None else grammars.cached(spec)

    def grammars(self) -> Grammars:
        """The compiler of structured outputs for this base's tokenizer (built on first use)."""
        with self._grammars_lock:
            if self._grammars is None:
                if self.tokenizer is None:
                    raise InvalidRequest(
                        "structured outputs need the base's tokenizer.json; this engine has none"
                    )
                self._grammars = Grammars(
                    self.tokenizer.to_str(), self._eos, self.model.config.vocab_size
                )
            return self._grammars

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> LoopMailbox:
        with self._lock:
            # A mailbox refers to its loop, so the weak keys alone never let one go: a script
            # that calls asyncio.run() per item would keep every loop it ever ran.
            for closed in [known for known in self._mailboxes if known.is_closed()]:
                del self._mailboxes[closed]
            box = self._mailboxes.get(loop)
            if box is None:
                box = self._mailboxes[loop] = LoopMailbox(loop)
            return box

    def _enqueue(self, *seqs: Sequence) -> None:
        # Under the lock that close() takes to set _closed: a request queued after close()
        # drained the inbox would never be answered. All of `seqs` are queued, or none.
        with self._lock:
            refusal: EngineError | None = None
            limit = self.config.max_waiting
            if self._closed:
                refusal = EngineClosed("the engine was closed")
            elif limit is not None and len(seqs) > limit:  # would never fit: not "retry later"
                refusal = InvalidRequest(
                    f"{len(seqs)} choices (sequences) in one request are more than the "
                    f"{limit} that may wait to start (max_waiting, the server's "
                    "--max-queued-requests); send fewer"
                )
            elif limit is not None and self.waiting + len(seqs) > limit:
                refusal = EngineOverloaded(
                    f"the server is overloaded: {self.waiting} choice(s) (sequences) already "
                    f"wait to start and this request adds {len(seqs)}; at most {limit} may wait "
                    "(max_waiting, the server's --max-queued-requests); retry later"
                )
            if refusal is not None:
                for seq in seqs:
                    self._seqs.pop(seq.request_id, None)
                raise refusal
            _link_forks(seqs)
            for seq in seqs:
                self._inbox.put(seq)
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Requests queued and not yet in the running batch (read without the step thread's help)."""
        return self._inbox.qsize() + len(self.scheduler.waiting)

    def submit(
        self,
        prompt: str | Seq[int],
        revision: str | None = None,
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
    ) -> RequestStream:
        """Queue a request from a running event loop; iterate the returned stream for its TokenEvents.

        With stream=False the first event still comes at once (it confirms admission), and the
        rest arrive together when the request ends.
        """
        return self.submit_many([(prompt, revision, params)], stream=stream)[0]

    def submit_many(
        self,
        requests: Seq[tuple[str | Seq[int], str | None, SamplingParams | None]],
        *,
        stream: bool = True,
        compiled: Mapping[StructuredOutput, Any] | None = None,
        max_unread: int | None = None,
        on_overflow: Callable[[], None] | None = None,
    ) -> list[RequestStream]:
        """submit() for several requests at once: all of them are queued, or none (a refusal raises).

        `compiled`: structured outputs compiled beforehand (`grammars().compile`, off the event
        loop), so that none is compiled here, even one the cache has dropped meanwhile.
        `max_unread` (with `stream`): events of these requests posted and not yet read, together,
        at most; past it all of them are cancelled, their queued events dropped, their streams
        raise SlowConsumer, and `on_overflow()` is called (on the loop).
        """
        mailbox = self._mailbox(asyncio.get_running_loop())
        seqs: list[Sequence] = []
        streams: list[RequestStream] = []
        backlog = None
        if stream and max_unread is not None:
            if max_unread < 1:
                raise ValueError(f"max_unread must be at least 1 or None, got {max_unread}")
            backlog = _Backlog(self, max_unread, on_overflow)
        with self._forgotten_on_error(seqs):
            for prompt, revision, params in map(_request_parts, requests):
                events: asyncio.Queue[_Posted] = (
                    asyncio.Queue() if backlog is None else _EventQueue(backlog)
                )
                sink = _LoopSink(self, mailbox, events, stream)
                seq = self._new_sequence(prompt, revision, params, sink, compiled)
                sink.request_id = seq.request_id
                if isinstance(events, _EventQueue):
                    events.request_id = seq.request_id
                seqs.append(seq)
                streams.append(RequestStream(self, seq, events))
            self._enqueue(*seqs)
        return streams

    @contextlib.contextmanager
    def _forgotten_on_error(self, seqs: list[Sequence]) -> Iterator[None]:
        """All or nothing: if queueing fails, the sequences made so far are dropped."""
        try:
            yield
        except BaseException:
            with self._lock:
                for seq in seqs:
                    self._seqs.pop(seq.request_id, None)
            raise

    async def stream(
        self,
        prompt: str | Seq[int],
        revision: str | None = None,
        params: SamplingParams | None = None,
    ) -> AsyncIterator[TokenEvent]:
        """submit() as an async generator; closing it cancels the request."""
        async with self.submit(prompt, revision, params) as events:
            async for event in events:
                yield event

    def cancel(self, request_id: int) -> None:
        """Cancel a queued or running request; its KV slot and adapter reference are freed next step."""
        with self._lock:
            seq = self._seqs.get(request_id)
        if seq is not None:
            seq.cancel()
            self._wake.set()

    def start_many(
        self, requests: Seq[tuple[str | Seq[int], str | None, SamplingParams | None]]
    ) -> list[Future[Completion]]:
        """Queue requests from any thread; each future gives the Completion (cancelling it cancels the request).

        All or nothing: a request refused here (InvalidRequest, ...) leaves none of them queued.
        """
        futures: list[Future[Completion]] = []
        seqs: list[Sequence] = []
        with self._forgotten_on_error(seqs):
            for prompt, revision, params in map(_request_parts, requests):
                future: Future[Completion] = Future()
                parts: list[TokenEvent] = []

                def sink(
                    item: TokenEvent | BaseException,
                    parts: list[TokenEvent] = parts,
                    future: Future[Completion] = future,
                    revision: str | None = revision,
                ) -> None:
                    if future.done():  # cancelled by its caller: the request is being reaped
                        return
                    if isinstance(item, BaseException):
                        future.set_exception(item)
                        return
                    parts.append(item)
                    if item.finish_reason is not None:
                        logprobs = [e.logprobs for e in parts if e.logprobs is not None]
                        future.set_result(
                            Completion(
                                text="".join(e.text for e in parts),
                                token_ids=[e.token_id for e in parts],
                                finish_reason=item.finish_reason,
                                revision=revision,
                                prompt_tokens=item.prompt_tokens,
                                logprobs=logprobs if len(logprobs) == len(parts) else None,
                                prompt_logprobs=parts[0].prompt_logprobs,
                            )
                        )

                seq = self._new_sequence(prompt, revision, params, sink)
                seqs.append(seq)
                future.add_done_callback(partial(self._cancel_if_cancelled, seq.request_id))
                futures.append(future)
            self._enqueue(*seqs)
        return futures

    def _cancel_if_cancelled(self, request_id: int, future: Future[Completion]) -> None:
        if future.cancelled():
            self.cancel(request_id)

    def generate_many(
        self,
        requests: Seq[tuple[str | Seq[int], str | None, SamplingParams | None]],
        timeout: float | None = None,
    ) -> list[Completion]:
        """Run requests together (they share batches) and wait for all of them, `timeout` seconds in all.

        On a timeout (or an interrupt) every request still running is cancelled, freeing its slots.
        """
        futures = self.start_many(requests)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            return [
                f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
                for f in futures
            ]
        except BaseException as err:
            unfinished = sum(1 for f in futures if not f.done())
            for f in futures:
                f.cancel()
            # The deadline passed, not a request's own TimeoutError (a source's socket, say).
            late = deadline is not None and time.monotonic() >= deadline
            if isinstance(err, TimeoutError) and late:
                raise TimeoutError(
                    f"{unfinished} of {len(futures)} requests had not finished after {timeout} s; "
                    "they were cancelled"
                ) from None
            raise

    def generate(
        self,
        prompt: str | Seq[int],
        revision: str | None = None,
        params: SamplingParams | None = None,
        timeout: float | None = None,
    ) -> Completion:
        """Run one request and wait for it."""
        return self.generate_many([(prompt, revision, params)], timeout)[0]

    # -- residency ------------------------------------------------------------------------------
    def prefetch(self, revision: str, *, pin: bool = False) -> Future[int | None]:
        """Start loading `revision` (slot if one is free or idle, else host cache); pin keeps it resident.

        EngineClosed once close() has begun; a load still queued when it ran fails its future
        with ResidencyClosed (both: the server is stopping, a 503).
        """
        if self._closed:
            raise EngineClosed("the engine was closed")
        if self.source is None:
            raise EngineError("this engine has no adapter source")
        try:
            shared = self.residency.warm(revision, pin=pin)
        except ResidencyClosed:
            # close() began since the check above: the same answer as a closed engine's.
            raise EngineClosed("the engine was closed") from None
        return _own_future(shared)

    async def warm(self, revision: str, *, pin: bool = False) -> int | None:
        """Await prefetch(): the slot index, or None when it only reached the host cache."""
        return await asyncio.wrap_future(self.prefetch(revision, pin=pin))

    def unpin(self, revision: str) -> bool:
        """Allow `revision` to be evicted again; False if it was not pinned."""
        return self.residency.unpin(revision)

    def problem(self) -> str | None:
        """Why the engine cannot serve although it is loaded (None: healthy), for health checks."""
        if self._thread is not None and not self._thread.is_alive() and not self._closed:
            return "the engine's step loop has stopped"
        sched = self.scheduler
        if sched.failed_steps_in_a_row >= UNHEALTHY_AFTER_FAILED_STEPS:
            return f"the last {sched.failed_steps_in_a_row} engine steps failed: {sched.last_error}"
        return None

    def summary(self) -> str:
        """One line on what the engine holds: the base, the KV cache and the adapter slots."""
        model, kv, pools = self.model, self.kv, self.pools
        dtype = str(model.dtype).removeprefix("torch.")
        n = self._threads
        threads = f" ({n} thread{'s' * (n != 1)})" if model.device.type == "cpu" else ""
        caching = ", prefix caching on" if self.config.prefix_caching else ""
        return (
            f"{model.num_parameters / 1e6:.1f}M parameters, {dtype} on {model.device}{threads}; "
            f"KV cache {kv.nbytes / 2**30:.2f} GiB for {kv.num_slots} sequences of {kv.max_len} "
            f"tokens{caching}; {pools.num_slots} adapter slots up to rank {self.config.max_lora_rank}, "
            f"{pools.nbytes / 2**20:.1f} MiB"
        )

    def residency_snapshot(self) -> dict[str, Any]:
        """Device slots and host-cache contents, for an admin endpoint."""
        return {
            "slots": self.residency.snapshot(),
            "pinned": self.residency.pinned(),
            "host_cache": {
                "revisions": self.residency.host.revisions(),
                "bytes": self.residency.host.nbytes,
                "max_bytes": self.residency.host.max_bytes,
            },
        }

    def stats(self) -> dict[str, Any]:
        """Counters and gauges for /metrics."""
        r = self.residency.stats
        s = self.scheduler.stats
        q = self.scheduler.snapshot()
        with self._lock:  # which _step holds while it moves requests from the inbox to the queue
            queue_depth = self.waiting
        p = self.scheduler.prefix.stats
        return {
            "slot_hits": r.slot_hits,
            "slot_misses": r.slot_misses,
            "host_hits": r.host_hits,
            "store_loads": r.store_loads,
            "evictions": r.evictions,
            "host_evictions": self.residency.host.evictions,
            "loads_failed": r.loads_failed,
            "load_count": r.load_count,
            "load_seconds_total": r.load_seconds_total,
            "last_load_seconds": r.last_load_seconds,
            "steps": s.steps,
            "prefill_tokens": s.prefill_tokens,
            "generated_tokens": s.generated_tokens,
            "requests_finished": s.finished,
            "requests_cancelled": s.cancelled,
            "requests_failed": s.failed,
            "batch_size": s.last_batch_size,
            "mean_batch_size": s.batch_size_sum / s.sampling_steps if s.sampling_steps else 0.0,
            "queue_depth": queue_depth,
            "running": q["running"],
            "prefilling": len(self.scheduler.prefilling),
            "kv_slots_free": self.scheduler.prefix.available,
            "kv_slots_cached": self.scheduler.prefix.idle,
            "prefix_cache_queried_tokens": p.queried_tokens,
            "prefix_cache_hit_tokens": p.hit_tokens,
            "prefix_cache_hits": p.hits,
            "adapter_slots": self.pools.num_slots,
            "adapter_slots_busy": sum(1 for x in self.residency.snapshot() if x["refs"] > 0),
            "host_cache_bytes": self.residency.host.nbytes,
        }
