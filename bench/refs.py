"""Refs benchmark: resolve one branch among 10^5 (and 10^6) in packed-refs.

Peers, measured side by side in this run on the same directory: dulwich's
DiskRefsContainer (reads all of packed-refs into a dict) and `git rev-parse`
(process spawn included). "Cold" means a fresh store object per lookup, as a CLI
process would see it. Prints `name: ours X, peer Y, ratio Z` lines.

    python bench/refs.py              # 10^5 and 10^6 branches
    python bench/refs.py --no-million # 10^5 only
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dulwich.refs import DiskRefsContainer

from mintvcs.refs import RefStore

ROOT = Path(__file__).resolve().parents[1]
IDENTITY = "bench <bench@localhost>"
GIT_ENV = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}


def branch(i: int) -> str:
    """Per-user policy branch name."""
    return f"refs/heads/user/{i:07d}"


def value(i: int) -> str:
    """A distinct 40-hex id per branch (lookups need no objects)."""
    return hashlib.sha1(str(i).encode()).hexdigest()


def timed(fn: Callable[[int], str | None], keys: list[int]) -> list[float]:
    """Seconds per call of fn(key), checking each answer."""
    out = []
    for k in keys:
        t0 = time.perf_counter()
        got = fn(k)
        out.append(time.perf_counter() - t0)
        if got != value(k):
            raise SystemExit(f"wrong answer for {branch(k)}: {got}")
    return out


def p99(xs: list[float]) -> float:
    """99th percentile (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.99 * len(s)))]


def fmt(s: float) -> str:
    """Seconds as a readable duration."""
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def line(name: str, ours: float, peer: float, peer_name: str) -> None:
    """One result line in the project's format."""
    print(
        f"{name}: ours {fmt(ours)}, {peer_name} {fmt(peer)}, ratio {peer / ours:.3g}x", flush=True
    )


def run(
    n: int, tmp: Path, rng: random.Random, lookups: int, dul_lookups: int, git_lookups: int
) -> None:
    """Build n packed branches and compare lookups against the peers."""
    d = tmp / f"n{n}.git"
    subprocess.run(["git", "init", "-q", "--bare", str(d)], env=GIT_ENV, check=True)
    t0 = time.perf_counter()
    RefStore(d).bulk_create((branch(i), value(i)) for i in range(n))
    size = (d / "packed-refs").stat().st_size
    print(
        f"# n={n}: wrote packed-refs ({size / 1e6:.1f} MB) in {fmt(time.perf_counter() - t0)}",
        flush=True,
    )

    keys = [rng.randrange(n) for _ in range(lookups)]

    def ours_cold(k: int) -> str | None:
        with RefStore(d) as s:
            return s.read(branch(k))

    warm = RefStore(d)

    def ours_warm(k: int) -> str | None:
        return warm.read(branch(k))

    def dulwich_cold(k: int) -> str | None:
        # Any: dulwich's NewType-wrapped bytes differ between its versions.
        refs: Any = DiskRefsContainer(d)
        return refs[branch(k).encode()].decode()

    def git_rev_parse(k: int) -> str | None:
        out = subprocess.run(
            ["git", "--git-dir", str(d), "rev-parse", branch(k)],
            env=GIT_ENV,
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def ours_process(k: int) -> str | None:
        # What a `mintvcs rev-parse`-like CLI would pay: interpreter start and import included.
        code = "import sys; from mintvcs.refs import RefStore; print(RefStore(sys.argv[1]).read(sys.argv[2]))"
        out = subprocess.run(
            [sys.executable, "-c", code, str(d), branch(k)],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        return out.stdout.strip()

    cold = timed(ours_cold, keys)
    hot = timed(ours_warm, keys)
    dul = timed(dulwich_cold, keys[:dul_lookups])
    gitt = timed(git_rev_parse, keys[:git_lookups])
    proc = timed(ours_process, keys[:git_lookups])
    warm.close()
    tag = f"resolve 1 of {n:.0e} branches".replace("e+0", "e")
    print(f"# ours: {len(cold)} lookups; p99 cold {fmt(p99(cold))}, p99 warm {fmt(p99(hot))}")
    line(f"{tag}, cold, median", statistics.median(cold), statistics.median(dul), "dulwich")
    line(f"{tag}, cold, p99 vs dulwich max", p99(cold), max(dul), "dulwich")
    line(
        f"{tag}, warm store, median", statistics.median(hot), statistics.median(dul), "dulwich cold"
    )
    line(
        f"{tag}, cold, median (git includes process spawn)",
        statistics.median(cold),
        statistics.median(gitt),
        "git rev-parse",
    )
    line(
        f"{tag}, new process each (spawn + import included)",
        statistics.median(proc),
        statistics.median(gitt),
        "git rev-parse",
    )

    # The write path: a locked CAS update with fsync and a reflog line.
    upd_keys = keys[:20]

    def ours_update(k: int) -> str | None:
        with RefStore(d) as s:
            cur = s.read(branch(k))
            s.update(branch(k), value(k + n), old=cur, message="bench", identity=IDENTITY)
        return value(k)

    def dulwich_update(k: int) -> str | None:
        refs: Any = DiskRefsContainer(d)
        name = branch(k).encode()
        refs.set_if_equals(name, refs[name], value(k + 2 * n).encode(), message=b"bench")
        return value(k)

    t_ours = timed(ours_update, upd_keys)
    t_dul = timed(dulwich_update, upd_keys[: max(1, dul_lookups // 2)])
    line(
        f"CAS update 1 of {n:.0e} branches, median".replace("e+0", "e"),
        statistics.median(t_ours),
        statistics.median(t_dul),
        "dulwich",
    )


def main() -> None:
    """Parse arguments and run the sizes asked for."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--no-million", action="store_true", help="skip the 10^6 run")
    ap.add_argument("--lookups", type=int, default=2000, help="our lookups per size")
    ap.add_argument("--dulwich-lookups", type=int, default=10, help="dulwich lookups per size")
    ap.add_argument("--git-lookups", type=int, default=10, help="git rev-parse lookups per size")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sizes = [10**5] if args.no_million else [10**5, 10**6]
    with tempfile.TemporaryDirectory(prefix="mint-bench-refs-") as tmp:
        for n in sizes:
            # dulwich takes seconds per cold lookup at 10^6: a few samples tell the story.
            dl = args.dulwich_lookups if n <= 10**5 else 2
            run(n, Path(tmp), rng, args.lookups, dl, args.git_lookups)


if __name__ == "__main__":
    main()
