"""Operational endpoints: `/health`, `/metrics`, and the bearer-token ones a hook or an operator calls:
`POST /v1/refs/notify`, `POST /v1/adapters/warm`, `POST /v1/adapters/unpin`, `GET /v1/adapters`."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from mintvcs.errors import MintError
from mintvcs.ids import is_object_id
from mintvcs.serve.app import (
    RETRY_AFTER,
    STATE,
    HTTPError,
    ServerState,
    check_bearer,
    expect_body,
    field_of,
    prefetch,
    read_json,
)
from mintvcs.serve.refwatch import check_spec
from mintvcs.store import UnknownRevisionError

if TYPE_CHECKING:
    from mintvcs.serve.engine import Engine


def _unavailable(body: dict[str, Any]) -> web.Response:
    """A 503 health answer, with Retry-After as every 503 of the server has."""
    return web.json_response(body, status=503, headers=RETRY_AFTER)


def _shown_to(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """The health answer this caller may read: with --api-key-scope all, the status alone
    unless it presents a token. Probes need none, but the base model's path, the device and
    error texts that name files are for those the token admits."""
    if request.app[STATE].config.api_key_scope != "all":
        return body
    try:
        check_bearer(request)
    except HTTPError:
        return {"status": body["status"]}
    return body


async def health(request: web.Request) -> web.Response:
    """200 once the base model is loaded; 503 while loading, after a failed load, while draining,
    unhealthy, or degraded (the repository is gone)."""
    body = _shown_to(request, _health(request.app[STATE]))
    return web.json_response(body) if body["status"] == "ok" else _unavailable(body)


def _health(state: ServerState) -> dict[str, Any]:
    """The whole health answer: `status` and what explains it."""
    if state.draining:
        return {"status": "draining"}
    if state.engine is None:
        if state.load_error is not None:
            return {"status": "failed", "error": str(state.load_error)}
        return {"status": "loading"}
    engine = state.engine
    problem = engine.problem()
    if problem is not None:  # loaded, but the step loop is dead or every step fails
        return {"status": "unhealthy", "error": problem}
    gone = state.check_repository()
    if gone is not None:  # moved, deleted or unmounted: only the base alone can be served
        return {"status": "degraded", "error": gone}
    return {
        "status": "ok",
        "base_model": str(state.config.base_model),
        "base_fingerprint": engine.base_fingerprint,
        "device": str(engine.model.device),
        "dtype": str(engine.model.dtype).removeprefix("torch."),
        "adapter_slots": engine.pools.num_slots,
        "max_model_len": engine.max_model_len,
        "uptime_s": round(time.time() - state.started, 3),
    }


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    state = request.app[STATE]
    state.harvest_load_latency()
    # Off the loop: with many refs in use, reading their files and formatting the series takes
    # long enough to stall every request the loop serves meanwhile. The metrics take locks.
    text = await asyncio.to_thread(state.metrics.render)
    return web.Response(
        text=text,
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


async def notify(request: web.Request) -> web.Response:
    """A hook says `ref` moved: re-resolve what the cache knew through it, and prefetch the new revision."""
    check_bearer(request)
    state = request.app[STATE]
    body = await read_json(request, empty_ok=True)  # its limits too: 413 at once, 408
    ref = field_of(body, "ref", (str,), None)
    if ref is not None:
        check_spec(ref)
    # The hook's old/new are advisory: what the ref holds now is read from the repository.
    for key in ("old", "new"):
        field_of(body, key, (str,), None)
    # Off the loop: the cached specs may walk long histories (`main~30000`), and an empty
    # notify re-resolves every one of them.
    return web.json_response(await asyncio.to_thread(_notified, state, ref, body.get("new")))


def _notified(state: ServerState, ref: str | None, new: str | None) -> dict[str, Any]:
    """The work of a notify, on a worker thread: moves reach on_move (counted, logged, prefetched)."""
    refreshed = state.watcher.refresh(ref)
    revision: str | None = None
    warnings: list[str] = []
    if ref is not None:
        try:
            revision = state.watcher.resolve(ref).commit
        except UnknownRevisionError:
            if new != "0" * 40:  # not a deletion the hook reported
                warnings.append(
                    f"{ref!r} names no revision in this server's repository: deleted, or the "
                    "hook serves another repository"
                )
        except MintError as err:
            warnings.append(f"{ref!r} cannot be read: {state.client_message(err)}")
        if ref == state.config.base_name:
            # Requests for this name run the base: loading the ref's revision would serve none.
            warnings.append(f"{ref!r} is the base's served name: requests for it run the base")
        elif revision is not None and state.engine is not None:
            prefetch(state.engine, revision)
        if (
            revision is not None
            and isinstance(new, str)
            and new != revision
            and not revision.startswith(new)
            and not _peels_to(state, new, revision)  # an annotated tag's object
        ):
            warnings.append(
                f"the ref holds {revision[:12]} now, not {new[:12]}; serving {revision[:12]}"
            )
    moved = [{"spec": r.spec, "revision": r.commit} for r in refreshed if r.spec != ref]
    return {"ref": ref, "revision": revision, "refreshed": moved, "warnings": warnings}


def _peels_to(state: ServerState, oid: str, commit: str) -> bool:
    """Whether object `oid` (a full id) is `commit` once tags are followed."""
    if not is_object_id(oid):
        return False
    try:
        return bool(state.repo.peel(oid) == commit)
    except MintError:
        return False


def _spec_of(state: ServerState, body: dict[str, Any], verb: str) -> str:
    """The revision or ref an admin request names (never the base's served name)."""
    revision, ref = field_of(body, "revision", (str,), None), field_of(body, "ref", (str,), None)
    if revision is not None and ref is not None:
        raise HTTPError(400, f"send 'ref' or 'revision' to {verb}, not both", "invalid_request")
    spec = revision or ref
    if spec is None:
        raise HTTPError(400, f"send 'ref' or 'revision' to {verb}", "missing_field")
    if spec == state.config.base_name:
        raise HTTPError(
            400,
            f"{spec!r} is the base model, always resident: there is no adapter to {verb}",
            "base_model",
        )
    return str(spec)


async def warm(request: web.Request) -> web.Response:
    """Prefetch a revision (by ref or commit) into a device slot, or the host cache when every slot is busy."""
    check_bearer(request)
    state = request.app[STATE]
    engine = state.require_engine()
    body = await read_json(request)
    spec = _spec_of(state, body, "warm")
    pin = field_of(body, "pin", (bool,), False)
    resolution = state.watcher.resolve(check_spec(spec))
    started = time.perf_counter()
    slot = await engine.warm(resolution.commit, pin=pin)
    if pin and resolution.ref is not None:
        _remember_pin(state, engine, spec, resolution.commit)
    return web.json_response(
        {
            "ref": spec,
            "revision": resolution.commit,
            "slot": slot,
            "pinned": pin,
            "tier": "device" if slot is not None else "host",
            "seconds": round(time.perf_counter() - started, 6),
        }
    )


# Specs remembered with what they pinned, at most: each distinct spelling pinned (`main`,
# `main~0`, ...) was kept until unpinned by that very spelling.
MAX_PIN_SPECS = 256


def _remember_pin(state: ServerState, engine: Engine, spec: str, commit: str) -> None:
    """Remember what `spec` pinned, for its unpin after its ref moved; within MAX_PIN_SPECS."""
    pins = state.pins_by_spec
    # Those whose revision was unpinned since (by another spelling, or by its id) release
    # nothing any more; past the bound, the oldest go too: their revision stays pinned, to be
    # unpinned by its id or by a spec that names it now.
    pinned = set(engine.residency.pinned())
    for stale in [s for s, c in pins.items() if c not in pinned or s == spec]:
        del pins[stale]
    pins[spec] = commit  # the most recent last
    while len(pins) > MAX_PIN_SPECS:
        del pins[next(iter(pins))]


async def unpin(request: web.Request) -> web.Response:
    """Let a pinned revision be evicted again."""
    check_bearer(request)
    state = request.app[STATE]
    engine = state.require_engine()
    spec = _spec_of(state, await read_json(request), "unpin")
    # What this spec pinned (the ref may have moved on, or been deleted since), and what it
    # names now.
    pinned_then = state.pins_by_spec.pop(spec, None)
    try:
        commit: str | None = state.watcher.resolve(check_spec(spec)).commit
    except UnknownRevisionError:
        # Gone since: a deleted ref still releases what it pinned, and a commit pinned by its
        # full id (pruned since) its own pin.
        if pinned_then is None and is_object_id(spec) and spec in engine.residency.pinned():
            pinned_then = spec
        if pinned_then is None:
            raise
        commit = None
    revisions = dict.fromkeys(r for r in (pinned_then, commit) if r is not None)
    unpinned = [revision for revision in revisions if engine.unpin(revision)]
    return web.json_response({"revision": commit, "pinned": False, "unpinned": unpinned})


async def adapters(request: web.Request) -> web.Response:
    """Which revisions are resident where (device slots, host cache) and which refs the cache maps to them."""
    check_bearer(request)
    state = request.app[STATE]
    engine = state.require_engine()
    snapshot = engine.residency_snapshot()
    snapshot["refs"] = [
        {"spec": r.spec, "ref": r.ref, "revision": r.commit} for r in state.watcher.tracked()
    ]
    return web.json_response(snapshot)


def add_routes(app: web.Application) -> None:
    """Register the operational routes."""
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/refs/notify", notify, expect_handler=expect_body)
    app.router.add_post("/v1/adapters/warm", warm, expect_handler=expect_body)
    app.router.add_post("/v1/adapters/unpin", unpin, expect_handler=expect_body)
    app.router.add_get("/v1/adapters", adapters)
