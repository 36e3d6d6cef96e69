"""The HTTP server: configuration, the app factory (engine in `cleanup_ctx`), error middleware, run loop.

Handlers live in `http_api` (generation, OpenAI compatibility, models) and `http_admin` (health,
metrics, notify, warm, residency). One middleware turns every MintError into a JSON error with the
status code its class maps to, so that bad input never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.log import server_logger as aiohttp_server_log

from mintvcs.errors import MintError, error_text
from mintvcs.messages import one_line
from mintvcs.serve import api_keys
from mintvcs.serve.api_keys import ApiKeys
from mintvcs.serve.http_metrics import (
    Counter,
    CounterFrom,
    Gauge,
    GaugeSeries,
    Histogram,
    Registry,
    one_two_five_buckets,
)
from mintvcs.serve.log_bad_requests import (
    BadRequestFilter,
    body_parse_failures,
    log_bad_request,
)
from mintvcs.serve.log_repeats import ALWAYS, AcceptFailures, RepeatFilter
from mintvcs.serve.refwatch import (
    InvalidRefSpec,
    RefMove,
    RefWatcher,
    check_spec,
    metric_label,
    names_an_ancestor,
)

if TYPE_CHECKING:
    from mintvcs.serve.engine import Engine
    from mintvcs.store import Repository

log = logging.getLogger("mintvcs.serve")

GENERATION_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
OTHER_REFS = "(other)"  # the metrics label of refs past ServerConfig.max_ref_labels
BASE_LABEL = "(base)"  # the metrics label of requests for the base alone
# Every 503 (loading, draining, unhealthy) tells a client when to come back (or go elsewhere).
RETRY_AFTER = {"Retry-After": "1"}


class ServerError(MintError):
    """A server configuration that cannot work (bad limits, unreadable key file)."""


class HTTPError(MintError):
    """A request the server refuses with a given status; `reason` is a short machine-readable code."""

    def __init__(self, status: int, message: str, reason: str | None = None) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


def base_name_problem(name: str) -> str | None:
    """Why `name` cannot select the base model alone (it names no ref, or reads as a revision
    spec a request could mean), or None when it can."""
    try:
        check_spec(name)
    except InvalidRefSpec:
        return "cannot name the base model (empty, control characters or '..')"
    if names_an_ancestor(name) or name == "HEAD" or name.startswith("refs/"):
        return "reads as a revision spec (HEAD, refs/..., ~, ^ or @{)"
    return None


@dataclass(frozen=True)
class ServerConfig:
    """Everything `mintvcs serve` takes; limits are validated here, paths when the server starts."""

    repo: Path
    base_model: Path
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str | None = None
    max_loras: int = 8  # device slots
    max_cpu_loras: int = 64  # decoded revisions kept in host memory (at max_rank)
    max_rank: int = 64
    api_key_file: Path | None = None
    api_key_scope: str = "admin"  # "all": every endpoint but /health needs the token too
    max_batch_size: int = 32
    # Choices (sequences) waiting to start; a request that would go past gets 503 (None: no bound).
    max_queued_requests: int | None = None
    max_num_batched_tokens: int = 4096  # prompt tokens prefilled per step (longer: chunked)
    cpu_threads: int | None = None  # None: the CPUs this process may use (affinity, cgroup quota)
    max_model_len: int | None = None
    max_prompt_bytes: int = 64 * 1024  # 413 above this
    max_tokens_limit: int = 1024  # 400 above this
    default_max_tokens: int = 16
    ref_poll_interval: float = 0.15
    prefetch_on_move: bool = True
    drain_timeout: float = 30.0
    enforce_eager: bool = False  # no CUDA graphs for decode steps
    prefix_caching: bool = True  # prompts reuse cached keys and values of a shared prefix
    # How replies with tool_choice "auto" are read for calls (None: "auto" is refused).
    tool_call_parser: str | None = None
    # The `model` (or `ref`) that asks for the base alone, no adapter (None: the base's folder name).
    served_model_name: str | None = None
    # Seconds a request body may take to arrive in full (408 after): a client that stalls
    # mid-body would otherwise hold its request, and a drain, open for ever.
    body_timeout: float = 30.0
    max_ref_labels: int = 1000  # distinct refs labelled in metrics; later ones count as (other)
    # Seconds one write of a response to its client may wait for the client to read (nginx's
    # send_timeout): past it the request is cancelled (499) and its connection closed, as a
    # client that reads nothing would otherwise hold its request's output and connection for ever.
    send_timeout: float = 60.0
    # Events generated for one streamed response and not yet written to its client, at most (all
    # its choices together): past it the request is cancelled as a slow consumer (499) and its
    # connection closed, so that a client reading slower than generation holds bounded memory.
    max_stream_backlog: int = 8192
    # "auto": generation_config.json's sampling keys are the defaults of requests that leave
    # them out, as vLLM's --generation-config auto; "vllm": the neutral defaults (1.0, no top-k...).
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        for name in (
            "max_loras",
            "max_cpu_loras",
            "max_rank",
            "max_batch_size",
            "max_num_batched_tokens",
            "max_prompt_bytes",
            "max_tokens_limit",
        ):
            if getattr(self, name) < 1:
                raise ServerError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_tokens < 1:
            raise ServerError(
                f"default_max_tokens must be at least 1, got {self.default_max_tokens}"
            )
        # A request without max_tokens gets the default, never more than the limit allows.
        object.__setattr__(
            self, "default_max_tokens", min(self.default_max_tokens, self.max_tokens_limit)
        )
        for name in ("cpu_threads", "max_queued_requests"):  # None: chosen for you, no bound
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ServerError(f"{name} must be at least 1 or None, got {value}")
        for name in ("body_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                raise ServerError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_stream_backlog < 1:
            raise ServerError(
                f"max_stream_backlog must be at least 1, got {self.max_stream_backlog}"
            )
        if not 0 <= self.port < 65536:
            raise ServerError(
                f"port {self.port} is not a TCP port; use 0..65535 (0 picks a free one)"
            )
        if self.api_key_scope not in ("admin", "all"):
            raise ServerError(f"api_key_scope {self.api_key_scope!r} must be 'admin' or 'all'")
        if self.api_key_scope == "all" and self.api_key_file is None:
            raise ServerError(
                "--api-key-scope all needs --api-key-file: without tokens every endpoint is open"
            )
        from mintvcs.serve.http_chat import TOOL_CALL_FORMATS  # it imports this module

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_FORMATS:
            raise ServerError(
                f"tool_call_parser {self.tool_call_parser!r} is not one this server reads: "
                f"{', '.join(TOOL_CALL_FORMATS)}"
            )
        if self.generation_config not in ("auto", "vllm"):
            raise ServerError(
                f"generation_config must be 'auto' or 'vllm', got {self.generation_config!r}"
            )
        if not (0.01 <= self.ref_poll_interval <= 1.0):
            raise ServerError(f"ref_poll_interval {self.ref_poll_interval} s must be in [0.01, 1]")
        name = self.base_name
        if (problem := base_name_problem(name)) is not None:
            given = (
                "--served-model-name"
                if self.served_model_name is not None
                else "the base folder's name"
            )
            raise ServerError(
                f"{given} {name!r} {problem}; set --served-model-name to a plain name"
            )

    @cached_property
    def base_name(self) -> str:
        """The name that selects the base model alone (served_model_name, else the base's id as
        init records it: org/name for a Hugging Face hub cache snapshot, or the folder's name)."""
        from mintvcs.base import default_model_id

        if self.served_model_name is not None:
            return self.served_model_name
        # The folder as given, links not followed: a linked snapshot is not named by its hash.
        return default_model_id(Path(self.base_model))


@dataclass
class ServerState:
    """What the handlers share: the engine (None while loading), the ref watcher, metrics, auth."""

    config: ServerConfig
    repo: Any
    watcher: RefWatcher
    api_keys: ApiKeys | None  # None: no --api-key-file, the endpoints are open
    tokenizer_config: dict[str, Any]
    # Sampling defaults for fields a request leaves out (generation_config.json's, under
    # --generation-config auto); a request's own value wins.
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)
    engine: Engine | None = None
    load_error: BaseException | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    draining: bool = False
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.time)
    metrics: Registry = field(default_factory=Registry)
    requests: Counter = field(init=False)
    tokens: Counter = field(init=False)
    load_latency: Histogram = field(init=False)
    ref_moves: Counter = field(init=False)
    # The commit each ref's last counted move went to: several specs in use (main, main~1,
    # refs/heads/main) report one move each, and the counter counts the ref's move once.
    moved_to: dict[str, str] = field(default_factory=dict)
    # (ref, what it named) of the deletions logged in the last second, with when (_on_move).
    deletions_logged: OrderedDict[tuple[str, str], float] = field(default_factory=OrderedDict)
    moves_lock: threading.Lock = field(default_factory=threading.Lock)  # for the two above
    # The revision each ref spec pinned (warm with pin): unpinning by that spec releases it
    # even after the ref moved on.
    pins_by_spec: dict[str, str] = field(default_factory=dict)
    # Why the repository cannot be read now (moved, deleted, unmounted since the start), or
    # None: logged when it changes, not per request; /health reports it.
    repo_problem: str | None = None
    _loads_seen: int = 0
    _ref_labels: set[str] = field(default_factory=set)

    def note_repository(self, problem: str | None) -> None:
        """Record whether the repository is readable: a log line when it goes, one when it is back."""
        if problem is not None and self.repo_problem is None:
            log.warning(
                "%s; requests for its revisions get 503 until it is back (the base alone is "
                "still served)",
                problem,
                extra=ALWAYS,
            )
        elif problem is None and self.repo_problem is not None:
            log.warning(
                "the repository %s is back; serving its revisions again",
                self.repo.git_dir,
                extra=ALWAYS,
            )
        self.repo_problem = problem

    def check_repository(self) -> str | None:
        """Whether the repository is there now (one stat): its problem, or None."""
        from mintvcs.store import RepositoryGoneError

        try:
            self.repo.check_present()
        except RepositoryGoneError as err:
            self.note_repository(str(err))
        else:
            self.note_repository(None)
        return self.repo_problem

    def client_message(self, err: BaseException) -> str:
        """An error's message as clients get it: the repository's location on this machine
        (a corrupt ref or pack names its file) shortened to its folder's name."""
        message = str(err)
        git_dir = Path(self.repo.git_dir)
        for location in {os.fspath(git_dir.resolve()), os.fspath(git_dir)}:
            message = message.replace(location, git_dir.name)
        return message

    def ref_label(self, ref: str | None, spec: str | None = None) -> str:
        """The metrics label of `ref` (refwatch.metric_label), or OTHER_REFS past max_ref_labels
        refs; `spec`: the name a client sent that resolved through `ref`, if known."""
        label = self._short_label(ref, spec)
        labels = self._ref_labels
        if label in labels:
            return label
        # Per-user branches that come and go would otherwise add series for ever.
        if len(labels) >= self.config.max_ref_labels:
            return OTHER_REFS
        labels.add(label)
        return label

    def _short_label(self, ref: str | None, spec: str | None = None) -> str:
        """metric_label(ref), or the full ref name where the short one reaches another ref (a
        branch beside a tag of its name), as /v1/models lists it: one series per ref. A short
        name a client sent (`spec`) reached `ref` already: no ref is read for it."""
        label = metric_label(ref)
        if ref is None or label in (ref, spec):
            return label
        if self.watcher.ref_of(label) != ref:
            return ref
        return label

    def __post_init__(self) -> None:
        self.idle.set()
        self.watcher.on_move = partial(_on_move, self)
        m = self.metrics
        self.requests = m.add(
            Counter(
                "mint_requests_total",
                "Generation requests by the branch or tag they named, endpoint and HTTP status.",
                ("ref", "endpoint", "status"),
            )
        )
        self.tokens = m.add(
            Counter(
                "mint_tokens_total",
                "Prompt and completion tokens by branch or tag and the request's status.",
                ("ref", "kind", "status"),
            )
        )
        self.ref_moves = m.add(
            Counter(
                "mint_ref_moves_total",
                "Moves of refs in use seen by the watcher or a notify.",
                ("ref",),
            )
        )
        self.load_latency = m.add(
            Histogram(
                "mint_adapter_load_seconds",
                "Time to load a revision into a device slot (store or host cache to slot).",
                (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            )
        )

        # Fine below a second, where a GPU answers, and reaching about half an hour / 80 min,
        # where a long CPU generation or a queue behind it lands (vLLM's range; everything
        # there would read +Inf).
        self.first_token_latency = m.add(
            Histogram(
                "mint_time_to_first_token_seconds",
                "From a generation request's arrival to its first token (queueing and prefill included).",
                one_two_five_buckets(0.001, 2000.0),
            )
        )
        self.request_latency = m.add(
            Histogram(
                "mint_e2e_request_latency_seconds",
                "From a generation request's arrival to its last byte, for requests answered 200.",
                one_two_five_buckets(0.01, 5000.0),
            )
        )

        def stat(key: str) -> Callable[[], float]:
            return lambda: float(self.engine.stats()[key]) if self.engine is not None else 0.0

        for key, help_text in (
            ("slot_hits", "Admissions whose revision was in a device slot when they asked."),
            (
                "slot_misses",
                "Admissions that waited for their revision's slot (its load, or a busy slot).",
            ),
            ("evictions", "Device slots reassigned to another revision."),
            ("host_hits", "Slot loads served from the host cache."),
            ("store_loads", "Revisions decoded from the store."),
            ("loads_failed", "Revision loads that failed (refused or unreadable)."),
            ("generated_tokens", "Tokens generated by the engine."),
            (
                "prefill_tokens",
                "Prompt tokens the engine computed (choices sharing a prompt count it once; "
                "prefix-cache hits not at all).",
            ),
            (
                "requests_cancelled",
                "Sequences cancelled (client disconnects); a request's n choices are n sequences.",
            ),
            ("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache."),
            (
                "prefix_cache_hit_tokens",
                "Prompt tokens whose keys and values were copied from the prefix cache.",
            ),
        ):
            m.add(CounterFrom(f"mint_{key}_total", help_text, stat(key)))
        for key, help_text in (
            ("batch_size", "Sequences in the last engine step."),
            ("mean_batch_size", "Mean sequences per engine step since start."),
            ("queue_depth", "Sequences (choices) waiting for a KV slot or their adapter."),
            ("running", "Sequences admitted: decoding, or their prompt going in."),
            ("prefilling", "Sequences whose prompt is going in over several steps (chunked)."),
            (
                "kv_slots_free",
                "KV cache slots a new sequence can take (each holds one sequence).",
            ),
            ("kv_slots_cached", "Of those, slots kept for the prompt prefix they hold."),
            ("adapter_slots_busy", "Device slots referenced by running requests."),
            ("host_cache_bytes", "Bytes of decoded revisions in host memory."),
        ):
            m.add(Gauge(f"mint_{key}", help_text, stat(key)))
        m.add(
            Gauge(
                "mint_ready",
                "1 once the base model is loaded, while the engine's steps succeed and the "
                "repository is there (as /health).",
                lambda: (
                    1.0
                    if self.engine is not None
                    and self.engine.problem() is None
                    and self.repo_problem is None
                    else 0.0
                ),
            )
        )
        m.add(
            GaugeSeries(
                "mint_ref_revision_info",
                "1 for the revision each branch or tag in use resolves to now (which one is live).",
                ("ref", "revision"),
                self._live_revisions,
            )
        )
        m.add(
            Gauge(
                "mint_ref_cache_entries",
                "Ref specs in the resolution cache.",
                lambda: float(len(self.watcher.tracked())),
            )
        )

    def _live_revisions(self) -> dict[tuple[str, ...], float]:
        """(branch or tag, commit) of each ref requested lately as is (not `main~1`), as it is now,
        for the refs that have a metrics label of their own (ref_label: max_ref_labels at most)."""
        labelled = self._ref_labels
        live: dict[tuple[str, ...], float] = {}
        for resolution in self.watcher.live():
            label = self._short_label(resolution.ref, resolution.spec)
            # A ref past max_ref_labels is left out, not summed under "(other)": which revision
            # "(other)" serves means nothing, and per-user branches would add series for ever.
            if label in labelled:
                live[(label, resolution.commit)] = 1.0
        return live

    def harvest_load_latency(self) -> None:
        """Move new slot-load durations from the engine's counters into the histogram."""
        if self.engine is None:
            return
        stats = self.engine.residency.stats
        new = stats.load_count - self._loads_seen
        if new <= 0:
            return
        self._loads_seen = stats.load_count
        # The engine keeps the last 64 durations; more loads than that between two harvests lose detail only.
        for seconds in stats.recent_load_seconds[-min(new, len(stats.recent_load_seconds)) :]:
            self.load_latency.observe(seconds)

    def require_engine(self, *, admitted: bool = False) -> Engine:
        """The engine, or a 503 while it loads, after it failed, or while draining.

        `admitted`: for a request the engine took before the drain began, which runs to its end.
        """
        if self.draining and not admitted:
            raise HTTPError(
                503, "the server is shutting down; retry on another instance", "draining"
            )
        if self.engine is None:
            if self.load_error is not None:
                raise HTTPError(
                    503,
                    f"the base model failed to load: {error_text(self.load_error)}",
                    "load_failed",
                )
            raise HTTPError(503, "the base model is still loading; poll GET /health", "loading")
        return self.engine


STATE = web.AppKey("mintvcs_state", ServerState)
# Per-request notes for the middleware's metrics: the ref spec once resolved, a status a stream ended with.
REF_KEY = web.RequestKey("mintvcs_ref", str)
STARTED_KEY = web.RequestKey("mintvcs_started", float)  # time.monotonic() when the request came
STATUS_KEY = web.RequestKey("mintvcs_status", int)
# Tokens by (ref label, kind): counted with the request's final status once it ends.
TOKENS_KEY = web.RequestKey("mintvcs_tokens", dict)


def count_tokens(request: web.Request, label: str, kind: str, n: int) -> None:
    """Note `n` prompt or completion tokens of this request, for mint_tokens_total at its end."""
    tally: dict[tuple[str, str], int] = request.setdefault(TOKENS_KEY, {})
    tally[(label, kind)] = tally.get((label, kind), 0) + n


# ---------------------------------------------------------------------------- errors
def status_for(err: MintError) -> int:
    from mintvcs.serve.adapters import AdapterNotFound, AdapterRefused
    from mintvcs.serve.engine import EngineClosed, EngineOverloaded, InvalidRequest, SlowConsumer
    from mintvcs.serve.kv_cache import KVCacheFull
    from mintvcs.serve.sampling import InvalidSamplingParams
    from mintvcs.serve.slots import ResidencyClosed, ResidencyError
    from mintvcs.serve.structured import StructuredOutputError
    from mintvcs.store import (
        NotAnAdapterRevision,
        RepositoryGoneError,
        StoreBusyError,
        UnknownRevisionError,
    )

    if isinstance(err, HTTPError):
        return err.status
    table: list[tuple[type[BaseException], int]] = [
        (InvalidRefSpec, 400),
        (UnknownRevisionError, 404),
        (AdapterNotFound, 404),
        (AdapterRefused, 422),
        (NotAnAdapterRevision, 422),  # a commit made with git: a README-only branch, say
        (InvalidSamplingParams, 400),
        (InvalidRequest, 400),
        (StructuredOutputError, 422),  # a grammar past llguidance's limits while generating
        (ResidencyClosed, 503),  # the server is stopping, as EngineClosed
        (ResidencyError, 409),
        (EngineClosed, 503),
        (EngineOverloaded, 503),
        (SlowConsumer, 499),  # the client stopped reading its stream: it is gone to us
        (KVCacheFull, 503),
        (StoreBusyError, 503),  # a gc elsewhere kept replacing packs: a retry will do
        # Moved, deleted or unmounted: not the client's fault, and not an answer about its
        # ref (a 404 would be cached as one); another instance, or a retry, may serve it.
        (RepositoryGoneError, 503),
    ]
    for cls, status in table:
        if isinstance(err, cls):
            return status
    return 500  # a MintError we did not expect from a request: corrupt store, unreadable file


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "unprocessable_entity_error",
    503: "service_unavailable",
}


# The flat body's `reason` when the raiser named none.
_REASONS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "too_large",
    422: "unprocessable",
    500: "internal_error",
    503: "unavailable",
}


def error_body(path: str, status: int, message: str, reason: str | None = None) -> dict[str, Any]:
    """The JSON error: OpenAI's nested shape under /v1, a flat one elsewhere."""
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if path.startswith("/v1/"):
        return {
            "error": {"message": message, "type": kind, "code": reason or status, "param": None}
        }
    return {"error": message, "type": kind, "reason": reason or _REASONS.get(status, kind)}


def error_response(
    request: web.Request, status: int, message: str, reason: str | None = None
) -> web.Response:
    """A JSON error response for `request`."""
    return web.json_response(error_body(request.path, status, message, reason), status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Count the request in flight; translate HTTP and MintError exceptions into JSON errors; record metrics."""
    state = request.app[STATE]
    state.inflight += 1
    state.idle.clear()
    request[STARTED_KEY] = time.monotonic()
    status = 500
    try:
        if state.config.api_key_scope == "all" and request.path != "/health":
            check_bearer(request)  # load balancers probe /health without credentials
        response = await handler(request)
        if not response.prepared:
            # Written here, not by aiohttp once this returns, so that --send-timeout bounds it
            # too: a client that never reads its answer would hold the connection for ever.
            await sent(request, _whole(request, response))
        status = request.get(STATUS_KEY, response.status)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            status = exc.status
            raise
        status = exc.status
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = error_response(request, exc.status, message)
        # Its headers but the body's: a 405's Allow (RFC 9110 §15.5.6).
        for key, value in exc.headers.items():
            if key.lower() not in ("content-type", "content-length"):
                response.headers[key] = value
        return _closed_if_body_unread(request, response)  # aiohttp's 413 for a chunked body
    except MintError as err:
        from mintvcs.store import RepositoryGoneError

        status = status_for(err)
        reason = getattr(err, "reason", None)
        if isinstance(err, RepositoryGoneError):
            state.note_repository(str(err))  # logged once, not per request
            reason = "repository_gone"
        # 503s (loading, draining, overloaded) are capacity, counted in the metrics; a log
        # line each would flood the log exactly when the server is busiest.
        elif status >= 500 and status != 503 and not isinstance(err, HTTPError):
            log.error("request %s %s failed: %s", request.method, request.path, err)
        message = state.client_message(err)
        response = error_response(request, status, message, reason)
        if status == 503:
            response.headers.update(RETRY_AFTER)
        if status == 401:  # RFC 9110: a 401 names the scheme it wants
            response.headers["WWW-Authenticate"] = 'Bearer realm="mintvcs"'

        if status == 408 or state.draining:
            # A body that never came leaves the connection unusable as an unread one does. A
            # draining server should not keep a client's connection alive for requests it will
            # refuse.
            response.force_close()
        return _closed_if_body_unread(request, response)
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except ConnectionResetError:  # the client went away while its body was being read
        status = 499
        return error_response(request, 499, "the client closed the connection")
    except Exception as err:
        log.exception("internal error on %s %s", request.method, request.path)
        # The message stays in the server's log: it may name paths that clients have no business seeing.
        response = error_response(
            request, 500, f"internal error ({type(err).__name__}); the server log has the details"
        )
        return _closed_if_body_unread(request, response)
    finally:
        state.inflight -= 1
        if state.inflight == 0:
            state.idle.set()
        if request.path in GENERATION_PATHS:
            state.requests.inc((request.get(REF_KEY, "(unresolved)"), request.path, str(status)))
            for (label, kind), n in request.get(TOKENS_KEY, {}).items():
                state.tokens.inc((label, kind, str(status)), n)
            if status == 200:
                state.request_latency.observe(time.monotonic() - request[STARTED_KEY])


async def sent(request: web.Request, write: Awaitable[None]) -> bool:
    """Await a write to the client; False (and status 499) when the client has gone, or has not
    read for ServerConfig.send_timeout seconds (then its connection is closed)."""
    timeout = request.app[STATE].config.send_timeout
    try:
        # aiohttp waits for the socket to drain without a deadline: a client that keeps its
        # connection open and reads nothing would hold the handler, its request and its
        # connection for as long as it likes (nginx's send_timeout, for the same reason).
        if sys.version_info >= (3, 11):
            # A third of wait_for's cost, which makes a task per write (one per SSE event).
            async with asyncio.timeout(timeout):
                await write
        else:
            await asyncio.wait_for(write, timeout)
    except TimeoutError:
        drop_slow_client(request, f"read nothing for {timeout:g} s (--send-timeout)")
        return False
    except (ConnectionError, RuntimeError):
        request[STATUS_KEY] = 499
        return False
    return True


def drop_slow_client(request: web.Request, why: str) -> None:
    """Close the connection of a client that stopped reading; its request ends as 499."""
    request[STATUS_KEY] = 499
    # One message per cause and limit, so the log's repeat filter keeps it to a line a minute.
    log.warning("a client %s: its request is cancelled and its connection closed", why)
    transport = request.transport
    if transport is not None:
        # Not close(): that waits to flush what the client is not reading.
        transport.abort()


async def _whole(request: web.Request, response: web.StreamResponse) -> None:
    """Write `response`, headers and body, as aiohttp would after the handler."""
    await response.prepare(request)
    await response.write_eof()


def _closed_if_body_unread(request: web.Request, response: web.Response) -> web.Response:
    """`response`, closing its connection if it answers before the request's body was read (a
    413 for a body declared too large): the client's next request would be read as the rest of
    that body (RFC 9110 §10.1.1)."""
    if not request.content.is_eof():
        response.force_close()
    return response


# ---------------------------------------------------------------------------- request helpers
def body_limit(config: ServerConfig) -> int:
    """The largest request body read (413 past it): room for a prompt of max_prompt_bytes
    written as JSON escapes, and the other fields."""
    return max(1 << 20, 4 * config.max_prompt_bytes + (64 << 10))


async def expect_body(request: web.Request) -> None:
    """The routes' `Expect: 100-continue` handler: a body declared over the limit is not
    invited (aiohttp's own handler sends 100 Continue first, and the client starts uploading
    what read_json then refuses); the handler answers 413 before reading any of it."""
    # aiohttp's own handler, which has no public name: it sends the 100 (or refuses an
    # Expect it does not know with 417).
    from aiohttp.web_urldispatcher import _default_expect_handler

    declared = request.content_length
    if declared is not None and declared > body_limit(request.app[STATE].config):
        return
    await _default_expect_handler(request)


async def read_json(request: web.Request, *, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object, or a 400 naming what is wrong with it (408 if it does not come;
    with `empty_ok`, no body is {})."""
    config = request.app[STATE].config
    declared, most = request.content_length, body_limit(config)
    if declared is not None and declared > most:
        # Refused before reading: waiting for a body that will be refused anyway would hold
        # the connection until the body timeout.
        raise HTTPError(
            413, f"the request body is {declared} bytes; at most {most} are read", "too_large"
        )
    limit = config.body_timeout
    try:
        with body_parse_failures(request):
            raw = await asyncio.wait_for(request.read(), limit)
    except TimeoutError:
        raise HTTPError(
            408, f"the request body did not arrive within {limit:g} s", "body_timeout"
        ) from None
    except Exception as err:
        # A body aiohttp cannot parse (bad chunks, a Content-Encoding it does not decode) is the
        # client's fault: a 400 and one warning line, not a 500 and a traceback quoting the body.
        reason = log_bad_request(log, request.remote, err)
        if reason is None:
            raise
        raise HTTPError(400, f"the request body is malformed: {reason}", "invalid_body") from None
    if not raw.strip():
        if empty_ok:
            return {}
        raise HTTPError(400, "the request body is empty; send a JSON object", "empty_body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise HTTPError(400, "the body nests JSON too deeply", "invalid_json") from None
    except ValueError as err:  # bad JSON, bad UTF-8, or an integer of over 4300 digits
        raise HTTPError(400, f"the body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(body, dict):
        raise HTTPError(
            400, f"the body must be a JSON object, got {type(body).__name__}", "invalid_json"
        )
    try:
        # JSON may spell a lone UTF-16 surrogate (\ud800), which no UTF-8 text can hold: refuse it
        # here, once, rather than let it reach the tokenizer or a ref file's name.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        raise HTTPError(
            400,
            f"the body holds a lone UTF-16 surrogate ({err.object[err.start]!a}); "
            "strings must be valid Unicode",
            "invalid_json",
        ) from None
    return body


_MISSING: Any = object()


def field_of(
    body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any = _MISSING
) -> Any:
    """body[name] checked against `kinds` (bool is not a number; floats must be finite); 400 otherwise."""
    if name not in body or body[name] is None:
        if default is _MISSING:
            raise HTTPError(400, f"field {name!r} is required", "missing_field")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
        if int not in kinds:
            try:
                value = float(value)
            except OverflowError:  # 10**400 is valid JSON
                raise HTTPError(
                    400, f"field {name!r} must be a finite number, got one past 1e308", "not_finite"
                ) from None
    elif int in kinds and isinstance(value, float) and value.is_integer():
        # 2.0 for 2, as pydantic's lax mode (vLLM) takes it: clients compute counts with '/'.
        ok, value = True, int(value)
    else:
        ok = isinstance(value, kinds)
    if not ok:
        names = " or ".join("number" if k is float else k.__name__ for k in kinds)
        raise HTTPError(
            400,
            f"field {name!r} must be {names}, got {type(value).__name__} {value!r:.60}",
            "wrong_type",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise HTTPError(400, f"field {name!r} must be a finite number, got {value}", "not_finite")
    return value


def check_bearer(request: web.Request) -> None:
    """401 unless the request carries one of the configured bearer tokens (none configured: open)."""
    keys = request.app[STATE].api_keys
    if keys is None:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPError(
            401,
            "this endpoint needs 'Authorization: Bearer <token>' (see --api-key-file)",
            "missing_token",
        )
    # aiohttp decodes header bytes that are not UTF-8 to lone surrogates: encode them back
    # (plain encode() raised, a 500 any client could cause); such a token is simply wrong.
    if not keys.accepts(token.strip().encode("utf-8", "surrogateescape")):
        raise HTTPError(401, "the bearer token is wrong", "wrong_token")


# ---------------------------------------------------------------------------- engine lifecycle
def engine_config(config: ServerConfig) -> Any:
    """The EngineConfig for a server config: device slots, rank, and a host cache sized in revisions."""

    from mintvcs.kernels.torch_ops import work_dtype
    from mintvcs.serve.engine import EngineConfig
    from mintvcs.serve.loader import read_config
    from mintvcs.serve.model import LORA_MODULES

    model = read_config(config.base_model)
    probe = EngineConfig(device=config.device, dtype=config.dtype)
    device = probe.torch_device()
    # The host cache holds factors as the slots do: on CPU, half types are held in fp32.
    itemsize = work_dtype(probe.torch_dtype(device, model.stored_dtype), device).itemsize
    # A revision of rank max_rank on every targeted linear is the largest the host cache must hold.
    per_revision = sum(
        config.max_rank * sum(model.linear_shape(m)) * itemsize for m in LORA_MODULES
    )
    per_revision *= model.num_hidden_layers
    return EngineConfig(
        device=config.device,
        dtype=config.dtype,
        max_batch_size=config.max_batch_size,
        max_waiting=config.max_queued_requests,
        max_num_batched_tokens=config.max_num_batched_tokens,
        cpu_threads=config.cpu_threads,
        max_model_len=config.max_model_len,
        adapter_slots=config.max_loras,
        max_lora_rank=config.max_rank,
        host_cache_bytes=max(1, config.max_cpu_loras * per_revision),
        cuda_graphs=not config.enforce_eager,
        prefix_caching=config.prefix_caching,
    )


def build_engine(config: ServerConfig) -> Engine:
    """Load the base model and open the store as the engine's adapter source (blocking; seconds)."""
    from mintvcs.serve.adapters import StoreSource
    from mintvcs.serve.engine import Engine

    # The loader thread gets its own Repository: dulwich object stores are not shared across threads.
    return Engine(config.base_model, engine_config(config), source=StoreSource(config.repo))


def read_tokenizer_config(base: Path) -> dict[str, Any]:
    """tokenizer_config.json as transformers reads it with the files beside it: the chat
    template of chat_template.jinja (over the config's), named templates from
    additional_chat_templates/*.jinja, and, for a config without added_tokens_decoder (an
    older save), the special tokens of special_tokens_map.json."""
    data: Any = {}
    path = Path(base) / "tokenizer_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as err:
        log.warning("ignoring unreadable %s: %s", path, err)
    data = data if isinstance(data, dict) else {}
    from mintvcs.serve.loader import read_special_tokens

    data.update(read_special_tokens(Path(base), data))
    templates: dict[str, str] = {}
    # transformers: "independent chat template file(s) ... take priority over template entries
    # in the tokenizer config"; chat_template.jinja is the default one.
    jinja, named = Path(base) / "chat_template.jinja", Path(base) / "additional_chat_templates"
    try:
        if jinja.is_file():
            templates["default"] = jinja.read_text()
        if named.is_dir():
            for file in sorted(named.glob("*.jinja")):
                templates[file.name.removesuffix(".jinja")] = file.read_text()
    except (OSError, ValueError) as err:
        log.warning("ignoring an unreadable chat template beside %s: %s", path, err)
    if not templates:
        config_template = data.get("chat_template")
        legacy = Path(base) / "chat_template.json"
        if not config_template and legacy.is_file():
            try:
                config_template = json.loads(legacy.read_text()).get("chat_template")
            except (OSError, ValueError, AttributeError) as err:
                log.warning("ignoring an unreadable chat template beside %s: %s", path, err)
        if config_template:
            data["chat_template"] = config_template
        return data
    # Template files replace the config's entry, as in transformers: named files alone have
    # no "default", and a chat that needs one is refused (render_chat), as transformers does.
    if list(templates) == ["default"]:
        data["chat_template"] = templates["default"]
    else:  # render_chat's named form: "tool_use" when tools are sent, else "default"
        data["chat_template"] = [{"name": k, "template": v} for k, v in templates.items()]
    return data


# generation_config.json's keys that vLLM (--generation-config auto) takes as request defaults;
# max_new_tokens is read as the default max_tokens.
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_sampling_defaults(base: Path) -> dict[str, float | int]:
    """generation_config.json's sampling keys that requests leaving them out get, as vLLM reads
    them (do_sample is not read: vLLM samples with them whatever it says); one that is not a
    valid value is left out, with a warning."""
    from mintvcs.serve.sampling import SamplingParams

    path = Path(base) / "generation_config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # the loader says so, once (it reads the file's EOS ids)
        return {}
    if not isinstance(data, dict):
        return {}
    defaults: dict[str, float | int] = {}
    for key in (*SAMPLING_DEFAULT_KEYS, "max_new_tokens"):
        value = data.get(key)
        if value is None:
            continue
        try:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"not a number: {value!r:.40}")
            if key == "max_new_tokens":
                if float(value) != int(value) or value < 1:
                    raise TypeError(f"not a positive integer: {value!r}")
                defaults["max_tokens"] = int(value)
                continue
            if key == "top_k":
                if float(value) != int(value):
                    raise TypeError(f"not an integer: {value!r}")
                value = int(value)
            else:
                value = float(value)
            checked: dict[str, Any] = {key: value}
            SamplingParams(**checked)  # the ranges a request's value must be in
        except (TypeError, ValueError, OverflowError, MintError) as err:
            log.warning("ignoring %s's %s: %s", path, key, err)
            continue
        defaults[key] = value
    return defaults


def new_state(config: ServerConfig) -> ServerState:
    """Open the repository and read what the handlers need; raises MintError for a bad setup."""
    from mintvcs.store import Repository

    if not (Path(config.base_model) / "config.json").is_file():
        raise ServerError(
            f"--base-model {config.base_model} has no config.json; point it at a HF checkpoint directory"
        )
    repo = Repository.open(config.repo)
    _warn_if_a_ref_is_named_as_the_base(repo, config.base_name)
    return ServerState(
        config=config,
        repo=repo,
        watcher=RefWatcher(repo),
        api_keys=None if config.api_key_file is None else ApiKeys(config.api_key_file),
        tokenizer_config=read_tokenizer_config(config.base_model),
        sampling_defaults=(
            read_sampling_defaults(config.base_model) if config.generation_config == "auto" else {}
        ),
    )


def _warn_if_a_ref_is_named_as_the_base(repo: Repository, name: str) -> None:
    """Say at start when the base's served name hides a revision (a branch, a tag, a commit id)."""
    try:
        hidden = repo.resolve(name)
    except MintError:
        return  # it names nothing in the repository
    log.warning(
        "%r, the base's served name, also names revision %s in the repository: requests for "
        "%r get the base alone, with no adapter; name the revision otherwise (refs/heads/%s, "
        "its commit id) or set --served-model-name",
        name,
        str(hidden)[:12],
        name,
        name,
    )


def count_move(state: ServerState, ref: str | None, commit: str) -> bool:
    """Count a ref's move to `commit` once, however many specs in use reported it; True the
    first time."""
    label = state.ref_label(ref)
    with state.moves_lock:
        if state.moved_to.get(label) == commit:
            return False
        state.moved_to[label] = commit
    state.ref_moves.inc((label,))
    return True


# The specs of one ref (`x`, `x~0`) report its deletion together, in one poll or notify:
# said once within this many seconds (a ref made again at that commit and deleted again later
# is said again).
_SAME_DELETION_S = 1.0


def _on_move(state: ServerState, move: RefMove) -> None:
    if move.new is None:
        # Deleted: one line however many specs in use went through it. Made again elsewhere,
        # it is the move from what it named here (refwatch's tombstones).
        key = (move.ref or move.spec, move.old)
        with state.moves_lock:  # the poller, notifies and requests report from their threads
            seen, now = state.deletions_logged, time.monotonic()
            while seen and now - next(iter(seen.values())) > _SAME_DELETION_S:
                seen.popitem(last=False)
            said = key in seen
            if not said:
                seen[key] = now
        if not said:
            log.info("%s deleted (it named %s)", key[0], move.old[:12])
        return
    first = True
    if move.ref is not None:
        # `main~1` and `main@{1}` move to other commits than main itself: count main's value.
        value = move.new if not names_an_ancestor(move.spec) else state.watcher.read_ref(move.ref)
        if value is not None:
            first = count_move(state, move.ref, value)
    if first:  # one line per move, as the metric counts it: `main` and `refs/heads/main` alike
        what = move.spec if move.ref in (None, move.spec) else f"{move.spec} ({move.ref})"
        log.info("%s moved %s -> %s", what, move.old[:12], move.new[:12])
    engine = state.engine
    if engine is not None and state.config.prefetch_on_move:
        prefetch(engine, move.new)


def prefetch(engine: Engine, revision: str) -> None:
    """Start loading `revision` so that the next request finds it resident; failures surface on requests."""
    try:
        future = engine.prefetch(revision)
    except MintError as err:
        log.warning("prefetch of %s failed: %s", revision[:12], err)
        return
    future.add_done_callback(
        lambda f: f.exception()
    )  # retrieve it so it is never reported as unhandled


def _warn_if_another_base(state: ServerState) -> None:
    """Say loudly when --base-model is not the base the repository was made for."""
    recorded = state.repo.base
    loaded = state.engine.base_fingerprint if state.engine is not None else None
    if recorded is None or recorded.fingerprint is None or loaded is None:
        return
    assert state.engine is not None
    if recorded.fingerprint not in (state.engine.base_fingerprints or (loaded,)):
        # Requests for its revisions get 422 base_fingerprint, each one; the server stays up for
        # the base alone and for revisions committed elsewhere, but this is most likely a typo.
        log.warning(
            "--base-model %s (%s) is not the base this repository was made for (%s, %s): its "
            "revisions will be refused with 422; point --base-model at that base",
            state.config.base_model,
            loaded[:19],
            recorded.model_id,
            recorded.fingerprint[:19],
        )


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    """Load the engine in a thread while the server already answers /health with 503; close it at exit."""
    state = app[STATE]
    factory: Callable[[ServerConfig], Engine] = app.get(ENGINE_FACTORY) or build_engine

    async def load() -> None:
        try:
            state.engine = await asyncio.to_thread(factory, state.config)
            log.debug("base model loaded from %s", state.config.base_model)  # the CLI says so
            _warn_if_another_base(state)
        except Exception as err:
            state.load_error = _without_traceback(err)
            if app.get(LOG_LOAD_ERROR, True):  # else whoever started it says so, once
                log.error("the base model failed to load: %s", error_text(err))
        finally:
            state.loaded.set()

    task = asyncio.create_task(load())
    try:
        yield
    finally:
        if not task.done():
            await asyncio.shield(task)
        if state.engine is not None:
            await asyncio.to_thread(state.engine.close)
        # aiohttp keeps every application that served a request in a module-wide cache, and
        # with it this state: holding the engine (or the error with what its load read) there
        # would keep the whole base, and its KV cache, for the life of the process.
        state.engine = None
        state.load_error = None
        state.repo.close()


def _without_traceback(err: BaseException) -> BaseException:
    """`err`, and the errors it was raised from, without their tracebacks (logged at debug level
    first): a load error is kept while the server runs, and the frames of a load that failed,
    and the closures their functions keep, hold every weight it had read."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("the base model failed to load:\n%s", "".join(traceback.format_exception(err)))
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        each = pending.pop()
        if each is None or id(each) in seen:
            continue
        seen.add(id(each))
        each.__traceback__ = None
        pending += [each.__cause__, each.__context__]
    return err


# How often the server lets go of packs another process deleted (release_removed_packs).
PACK_RELEASE_SECONDS = 10.0


async def _watcher_ctx(app: web.Application) -> AsyncIterator[None]:
    """Poll the refs in use; harvest slot-load durations for the histogram twice a second;
    release deleted packs every PACK_RELEASE_SECONDS."""
    state = app[STATE]

    async def harvest() -> None:
        while True:
            await asyncio.sleep(0.5)
            state.harvest_load_latency()
            # One stat: the log says when the repository goes and when it is back, whether or
            # not requests come meanwhile.
            state.check_repository()

    async def reread_keys(keys: ApiKeys) -> None:
        # On a timer, not per request: a rotation is taken within two intervals whatever the
        # traffic, and on a thread of its own, not awaited: a read that hangs (a stuck mount, a
        # FIFO) stalls neither the loop nor a request, which checks the tokens held. A daemon
        # thread, not the loop's executor, whose threads are joined at exit: one stuck read
        # would keep a drained server from ever exiting. due() lets one read run at a time.
        while True:
            await asyncio.sleep(api_keys.CHECK_INTERVAL / 2)
            keys.warn_if_stalled()  # a read that never ends stalls every rotation: say so
            if keys.due():
                threading.Thread(target=keys.refresh, name="mint-api-keys", daemon=True).start()

    async def release_packs() -> None:
        # A gc or repack by another process deletes packs this server still reads from, and
        # whose objects it never misses: let go of them, or their space stays taken.
        from mintvcs.serve.adapters import StoreSource

        while True:
            await asyncio.sleep(PACK_RELEASE_SECONDS)
            source = None if state.engine is None else state.engine.source
            repos = [state.repo, *([source.repo] if isinstance(source, StoreSource) else [])]
            for repo in repos:
                try:
                    await asyncio.to_thread(repo.release_removed_packs)
                except Exception as err:  # a store another process is rewriting: next time
                    log.warning("could not rescan the packs (%s: %s)", type(err).__name__, err)

    tasks = [
        asyncio.create_task(state.watcher.run(interval=state.config.ref_poll_interval)),
        asyncio.create_task(harvest()),
        asyncio.create_task(release_packs()),
    ]
    if state.api_keys is not None:
        tasks.append(asyncio.create_task(reread_keys(state.api_keys)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _repeats_ctx(app: web.Application) -> AsyncIterator[None]:
    """Hold back repeats of a warning or error while the app runs (log_repeats), turn aiohttp's
    errors for requests it cannot parse into warning lines held back alike (log_bad_requests),
    and collapse the event loop's reports of accept() failing for want of a descriptor into a
    line a while."""
    repeats = RepeatFilter()
    log.addFilter(repeats)
    bad_requests = BadRequestFilter(repeats)
    aiohttp_server_log.addFilter(bad_requests)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(AcceptFailures(log, previous))
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
        aiohttp_server_log.removeFilter(bad_requests)
        log.removeFilter(repeats)


ENGINE_FACTORY: web.AppKey[Callable[[ServerConfig], Engine]] = web.AppKey("mintvcs_engine_factory")
# False: the base's load error is reported by the caller (the CLI's one `error:` line), not logged.
LOG_LOAD_ERROR: web.AppKey[bool] = web.AppKey("mintvcs_log_load_error")


def create_app(
    config: ServerConfig,
    *,
    engine_factory: Callable[[ServerConfig], Engine] | None = None,
    log_load_error: bool = True,
) -> web.Application:
    """The aiohttp application for `config`; the engine loads in the background once the app
    starts (a load that fails is logged, unless not `log_load_error`: the caller reports it)."""
    from mintvcs.serve import http_admin, http_api

    app = web.Application(middlewares=[error_middleware], client_max_size=body_limit(config))
    app[STATE] = new_state(config)
    app[LOG_LOAD_ERROR] = log_load_error
    if engine_factory is not None:
        app[ENGINE_FACTORY] = engine_factory
    app.cleanup_ctx.append(_repeats_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    app.cleanup_ctx.append(_watcher_ctx)
    http_api.add_routes(app)
    http_admin.add_routes(app)
    return app


# ---------------------------------------------------------------------------- running
_CLEANUP_GRACE_S = 2.0
# Each drains: SIGHUP too (a closed terminal), which by default kills at once; unless the
# process was started ignoring it (nohup), which it keeps honouring.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _stop_signals() -> list[signal.Signals]:
    return [s for s in _STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]


# Idle keep-alive connections close after this; longer than the usual load balancer idle
# timeout (60 s), so that the balancer, not the server, closes them first.
KEEPALIVE_TIMEOUT_S = 75.0


@dataclass
class RunningServer:
    """A started server: its URL, app and runner; `stop()` drains and shuts it down."""

    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> ServerState:
        """The shared state (engine, watcher, metrics)."""
        return self.app[STATE]

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the base model is loaded; raise its error if it failed."""
        await asyncio.wait_for(self.state.loaded.wait(), timeout)
        if self.state.load_error is not None:
            raise self.state.load_error

    async def stop(self, force: asyncio.Event | None = None) -> None:
        """Refuse new requests, let running ones finish (up to drain_timeout, or until `force` is set), then close everything."""
        state = self.state
        state.draining = True
        waits = {asyncio.ensure_future(state.idle.wait())}
        if force is not None:
            waits.add(asyncio.ensure_future(force.wait()))
        try:
            await asyncio.wait(
                waits, timeout=state.config.drain_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for wait in waits:
                wait.cancel()
        if not state.idle.is_set():
            forced = force is not None and force.is_set()
            log.warning(
                "%d request(s) still running%s",
                state.inflight,
                "; signalled again: stopping at once"
                if forced
                else f" after {state.config.drain_timeout:g} s; closing anyway",
            )
            if state.engine is not None:
                # Ends each of them now (EngineClosed: a 503, or an error event in a stream);
                # left running, they would go on while aiohttp waits for their handlers twice
                # over at cleanup, seconds past the drain timeout.
                await asyncio.to_thread(state.engine.close)
        await self.runner.cleanup()


async def start_server(
    config: ServerConfig,
    *,
    engine_factory: Callable[[ServerConfig], Engine] | None = None,
    log_load_error: bool = True,
) -> RunningServer:
    """Create the app, bind it, and return at once (the engine keeps loading in the background)."""
    app = create_app(config, engine_factory=engine_factory, log_load_error=log_load_error)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its sequence.
    # stop() has drained already: whatever still runs at cleanup is cancelled after a moment.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=_CLEANUP_GRACE_S,
        keepalive_timeout=KEEPALIVE_TIMEOUT_S,
    )
    await runner.setup()
    site: web.BaseSite
    try:
        if config.host == "::":
            # Every address, IPv4 too, as vLLM's server listens on `::`: asyncio
            # makes an IPv6 socket IPv6-only, which refused IPv4 clients and probes.
            site = web.SockSite(runner, _dual_stack_socket(config.port))
        else:
            site = web.TCPSite(runner, config.host, config.port)
        await site.start()
    except BaseException:  # the port taken, say: the app's contexts (the engine, the log's
        await runner.cleanup()  # repeat filter) are undone, not left in the process
        raise
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in str(host) else host
    return RunningServer(f"http://{shown}:{port}", app, runner)


def _dual_stack_socket(port: int) -> socket.socket:
    """A listening TCP socket bound to `::` that takes IPv4 connections too."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's own sockets
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _print_flushed(line: str) -> None:
    print(line, flush=True)  # whoever started the server waits for the line naming its port


def _complain(line: str) -> None:
    """An `error:` line on stderr; one that a full or closed stderr cannot take is dropped
    (the exit status still tells)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        # Escaped, as the CLI's: what the line names (a path, a file's error) must neither
        # break it in two nor drive the terminal.
        print(one_line(line), file=sys.stderr, flush=True)


async def serve_until_signalled(
    config: ServerConfig,
    *,
    out: Callable[[str], None] = _print_flushed,
    err: Callable[[str], None] = _complain,
    engine_factory: Callable[[ServerConfig], Engine] | None = None,
) -> int:
    """Run the server until SIGTERM, SIGINT or SIGHUP, then drain; the exit status (1 if the
    base failed to load, said once through `err`)."""
    server = await start_server(config, engine_factory=engine_factory, log_load_error=False)
    out(
        f"mintvcs serve: listening on {server.url} (repository {one_line(str(config.repo))}, "
        f"base {one_line(str(config.base_model))}, served alone as {config.base_name!r})"
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = _stop_signals()  # read before our handlers replace what the process inherited
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    loaded = asyncio.create_task(server.state.loaded.wait())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({loaded, stopped}, return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if loaded.done() and server.state.load_error is not None:
        err(f"error: the base model failed to load: {error_text(server.state.load_error)}")
        status = 1
    else:
        if loaded.done():
            engine = server.state.engine
            held = f": {engine.summary()}" if engine is not None else ""
            out(f"mintvcs serve: base model loaded; ready{held}")
            defaults = server.state.sampling_defaults
            if defaults:
                out(
                    "mintvcs serve: requests that leave them out sample with generation_config.json's "
                    + ", ".join(f"{k}={v}" for k, v in defaults.items())
                    + " (--generation-config vllm: the neutral defaults)"
                )
        await stopped
    force = asyncio.Event()
    for sig in signals:  # a second signal: stop without waiting
        loop.add_signal_handler(sig, force.set)
    if status == 0 and server.state.loaded.is_set():  # without a base, nothing runs to drain
        out(
            f"mintvcs serve: draining running requests (up to {config.drain_timeout:g} s; "
            "signal again to stop at once)"
        )
    stopped.cancel()
    loaded.cancel()
    stopping = asyncio.create_task(server.stop(force))
    if not server.state.loaded.is_set():
        # Nothing can be running without a base, and the base loads in a worker thread that
        # cannot be interrupted and that Python would wait for at exit: a large checkpoint
        # would hold the process for minutes, past any orchestrator's grace period.
        await asyncio.wait({stopping}, timeout=_CLEANUP_GRACE_S + 1.0)
        if not stopping.done():
            out("mintvcs serve: stopped while the base model was loading")
            for stream in (sys.stdout, sys.stderr):  # _exit skips Python's own flushing
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(status)
    await stopping
    out("mintvcs serve: stopped")
    return status


class OneLineFormatter(logging.Formatter):
    """Log lines whose message has its control characters and bidi overrides escaped: a ref
    name, spec or path a line names comes from whoever wrote the repository, and must not
    drive the terminal (C1's CSI), reorder the line or forge another (a traceback's lines,
    which follow the message, stay as they are)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        escaped = copy.copy(record)  # other handlers see the record as it was
        escaped.message = one_line(record.message)
        return super().formatMessage(escaped)


def run(config: ServerConfig) -> int:
    """Blocking entry point for the CLI."""
    level = os.environ.get("MINT_LOG_LEVEL", "INFO")
    if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ServerError(f"MINT_LOG_LEVEL={level!r:.40}: use DEBUG, INFO, WARNING or ERROR")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])

    def out(line: str) -> None:
        # Whoever read the first line (the port) may have closed the pipe since, as
        # `mintvcs serve ... | head -1` does: a daemon keeps serving without its stdout.
        try:
            print(line, flush=True)
        except (BrokenPipeError, ValueError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        except OSError as failure:
            # A full disk (`> /dev/full`): the server is bound and keeps serving, as without a
            # stdout; the line goes to the log instead, and what stdout still buffers to
            # /dev/null, not into a second failure (a traceback) as the process exits.
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.close(null)
            log.warning(
                "write failure on 'stdout': %s; serving on without it: %s",
                failure.strerror or failure,
                line,
            )

    return asyncio.run(serve_until_signalled(config, out=out))


class BackgroundServer:
    """A server on its own event-loop thread (for the demo, benchmarks and tests); a context manager."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        engine_factory: Callable[[ServerConfig], Engine] | None = None,
    ) -> None:
        import threading

        self.config = config
        self.engine_factory = engine_factory
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="mintvcs-http", daemon=True
        )
        self.server: RunningServer | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:40123."""
        assert self.server is not None, "start() the server first"
        return self.server.url

    @property
    def state(self) -> ServerState:
        """The running server's shared state."""
        assert self.server is not None, "start() the server first"
        return self.server.state

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, timeout: float = 120.0, *, wait: bool = True) -> str:
        """Bind and return the URL; with wait, only once the base model is loaded (/health answers 200)."""
        self._thread.start()
        self.server = self.call(start_server(self.config, engine_factory=self.engine_factory))
        if wait:
            self.wait_ready(timeout)
        return self.server.url

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the base model is loaded; raise its load error if it failed."""
        assert self.server is not None, "start() the server first"
        self.call(self.server.wait_ready(timeout))

    def stop(self) -> None:
        """Drain, shut down, and stop the loop thread."""
        if self.server is not None:
            self.call(self.server.stop())
            self.server = None
        if self._thread.is_alive():
            # Join the threads that loaded and closed the engine: one that has not yet let go
            # of its work item holds the engine, weights and KV cache, past stop(). Bounded: a
            # read stuck on a dead mount must not hang stop() too.
            with contextlib.suppress(TimeoutError):
                self.call(self.loop.shutdown_default_executor(), _CLEANUP_GRACE_S)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        self.loop.close()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
