"""Operational endpoints: `/health`, `/metrics`, and the bearer-token ones a hook or an operator calls:
`POST /v1/refs/notify`, `POST /v1/adapters/warm`, `POST /v1/adapters/unpin`, `GET /v1/adapters`."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from mintvcs.errors import MintError
from mintvcs.ids import is_object_id
from mintvcs.serve.app import (
    RETRY_AFTER,
    STATE,
    HTTPError,
    ServerState,
    check_bearer,
    count_move,
    field_of,
    prefetch,
    read_json,
)
from mintvcs.serve.refwatch import check_spec, names_an_ancestor


def _unavailable(body: dict[str, str]) -> web.Response:
    """A 503 health answer, with Retry-After as every 503 of the server has."""
    return web.json_response(body, status=503, headers=RETRY_AFTER)


async def health(request: web.Request) -> web.Response:
    """200 once the base model is loaded; 503 while loading, after a failed load, while draining, or unhealthy."""
    state = request.app[STATE]
    if state.draining:
        return _unavailable({"status": "draining"})
    if state.engine is None:
        if state.load_error is not None:
            return _unavailable({"status": "failed", "error": str(state.load_error)})
        return _unavailable({"status": "loading"})
    engine = state.engine
    problem = engine.problem()
    if problem is not None:  # loaded, but the step loop is dead or every step fails
        return _unavailable({"status": "unhealthy", "error": problem})
    return web.json_response(
        {
            "status": "ok",
            "base_model": str(state.config.base_model),
            "base_fingerprint": engine.base_fingerprint,
            "device": str(engine.model.device),
            "dtype": str(engine.model.dtype).removeprefix("torch."),
            "adapter_slots": engine.pools.num_slots,
            "max_model_len": engine.max_model_len,
            "uptime_s": round(time.time() - state.started, 3),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    state = request.app[STATE]
    state.harvest_load_latency()
    return web.Response(
        text=state.metrics.render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


async def notify(request: web.Request) -> web.Response:
    """A hook says `ref` moved: forget what the cache knew about it, re-resolve, and prefetch the new revision."""
    check_bearer(request)
    state = request.app[STATE]
    body = await read_json(request, empty_ok=True)  # its limits too: 413 at once, 408
    ref = field_of(body, "ref", (str,), None)
    if ref is not None:
        check_spec(ref)
    # The hook's old/new are advisory: what the ref holds now is read from the repository.
    for key in ("old", "new"):
        field_of(body, key, (str,), None)
    # What the ref held as this server last read it: a notify moves nothing when it still holds that.
    served = {
        r.ref: r.commit
        for r in state.watcher.tracked()
        if r.ref is not None and not names_an_ancestor(r.spec)
    }
    forgotten = state.watcher.invalidate(ref)
    revision: str | None = None
    moved: list[dict[str, Any]] = []
    warnings: list[str] = []
    if ref is not None:
        try:
            resolution = state.watcher.resolve(ref)
        except MintError:
            resolution = None  # deleted: requests naming it will get 404
        else:
            revision = resolution.commit
            if served.get(resolution.ref, revision) != revision:
                count_move(state, resolution.ref, revision)
        new = body.get("new")
        if ref == state.config.base_name:
            # Requests for this name run the base: loading the ref's revision would serve none.
            warnings.append(f"{ref!r} is the base's served name: requests for it run the base")
        elif revision is not None and state.engine is not None:
            prefetch(state.engine, revision)
        if revision is None and new != "0" * 40:  # not a deletion the hook reported
            warnings.append(
                f"{ref!r} names no revision in this server's repository: deleted, or the hook "
                "serves another repository"
            )
        elif (
            revision is not None
            and isinstance(new, str)
            and new != revision
            and not revision.startswith(new)
            and not _peels_to(state, new, revision)  # an annotated tag's object
        ):
            warnings.append(
                f"the ref holds {revision[:12]} now, not {new[:12]}; serving {revision[:12]}"
            )
    for spec in forgotten:
        if spec == ref:
            continue
        try:
            res = state.watcher.resolve(spec)
        except MintError:
            continue
        moved.append({"spec": spec, "revision": res.commit})
    return web.json_response(
        {"ref": ref, "revision": revision, "refreshed": moved, "warnings": warnings}
    )


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


async def unpin(request: web.Request) -> web.Response:
    """Let a pinned revision be evicted again."""
    check_bearer(request)
    state = request.app[STATE]
    engine = state.require_engine()
    spec = _spec_of(state, await read_json(request), "unpin")
    commit = state.watcher.resolve(check_spec(spec)).commit
    engine.unpin(commit)
    return web.json_response({"revision": commit, "pinned": False})


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
    app.router.add_post("/v1/refs/notify", notify)
    app.router.add_post("/v1/adapters/warm", warm)
    app.router.add_post("/v1/adapters/unpin", unpin)
    app.router.add_get("/v1/adapters", adapters)
