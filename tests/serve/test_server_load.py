"""500 concurrent requests over 50 refs while main moves 10 times: no errors, and every response's
revision is a value its ref held while the request was being admitted (checked against the reflog)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from mintvcs import porcelain
from mintvcs.serve.app import BackgroundServer, ServerConfig
from tests.serve.http_kit import commit_on, variant

REQUESTS = 500
REFS = 50
MOVES = 10
SPREAD_S = 1.5  # requests start over this window; main moves within it


@pytest.mark.slow
def test_500_requests_over_50_refs_while_main_moves(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    repo = porcelain.init(tmp_path / "repo", str(tiny_base))
    history = [
        commit_on(repo, "main", variant(peft_adapter, tmp_path / f"v{i}", 0.5 + 0.1 * i), f"v{i}")
        for i in range(12)
    ]
    branches = {f"user/{i:02d}": history[i % len(history)] for i in range(REFS - 1)}
    for name, commit in branches.items():
        porcelain.branch_create(repo, name, commit)
    refs = ["main", *branches]
    moves_src = [variant(peft_adapter, tmp_path / f"m{i}", 2.0 + 0.1 * i) for i in range(MOVES)]

    config = ServerConfig(
        repo=tmp_path / "repo",
        base_model=tiny_base,
        port=0,
        max_model_len=64,
        max_loras=8,
        max_rank=16,
    )
    with BackgroundServer(config) as server:
        moves, results = asyncio.run(_load(server.url, refs, repo, moves_src))
        stats = server.state.engine.stats() if server.state.engine else {}

    errors = [r for r in results if r["status"] != 200]
    assert not errors, errors[:5]
    assert len(results) == REQUESTS

    # main's history from the reflog: the values it held, oldest first; our 10 moves are its tail.
    log = repo.refs.reflog("refs/heads/main")
    values = [e.new for e in log]
    assert values[-MOVES:] == [commit for commit, _, _ in moves]
    # When each value started and stopped being main's (client clock); values before the test: always.
    began = {commit: start for commit, start, _ in moves}
    ended: dict[str, float] = {}
    for (prev, _, _), (_, _, end) in zip(
        [(values[-MOVES - 1], 0.0, 0.0), *moves[:-1]], moves, strict=True
    ):
        ended[prev] = end
    seen_main = set()
    for r in results:
        if r["ref"] != "main":
            assert r["revision"] == branches[r["ref"]] == repo.resolve(r["ref"])
            continue
        rev = r["revision"]
        assert rev in values, f"{rev} was never main according to the reflog"
        seen_main.add(rev)
        # Admission happened between send and receive: the value must have been main's at some point then.
        assert began.get(rev, float("-inf")) <= r["recv"], (
            "a revision was served before main moved to it"
        )
        assert ended.get(rev, float("inf")) >= r["send"], (
            "a revision was served after main had moved on"
        )
    edges = sorted([(r["send"], 1) for r in results] + [(r["recv"], -1) for r in results])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    print(f"peak concurrency {peak}, main revisions seen {len(seen_main)}, stats {stats}")
    assert len(seen_main) >= 3, (
        f"the load did not overlap the moves (saw {len(seen_main)} revisions of main)"
    )
    assert stats["evictions"] > 0  # 22 revisions through 8 slots


async def _load(
    url: str, refs: list[str], repo: Any, moves_src: list[Path]
) -> tuple[list[tuple[str, float, float]], list[dict[str, Any]]]:
    import aiohttp

    moves: list[tuple[str, float, float]] = []

    async def move_main() -> None:
        for i, src in enumerate(moves_src):
            await asyncio.sleep(SPREAD_S / (MOVES + 1))
            start = time.monotonic()
            commit = await asyncio.to_thread(commit_on, repo, "main", src, f"move {i}")
            moves.append((commit, start, time.monotonic()))

    async def one(session: aiohttp.ClientSession, i: int) -> dict[str, Any]:
        await asyncio.sleep(i * SPREAD_S / REQUESTS)
        ref = refs[i % len(refs)]
        send = time.monotonic()
        async with session.post(
            url + "/generate",
            json={"prompt": f"request {i}", "ref": ref, "max_tokens": 2, "temperature": 0},
        ) as resp:
            body = await resp.json()
        recv = time.monotonic()
        return {
            "ref": ref,
            "status": resp.status,
            "revision": body.get("revision"),
            "send": send,
            "recv": recv,
            "body": body,
        }

    connector = aiohttp.TCPConnector(limit=REQUESTS)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        mover = asyncio.create_task(move_main())
        results = await asyncio.gather(*(one(session, i) for i in range(REQUESTS)))
        await mover
    return moves, list(results)
