"""Every benchmark runs end to end at its smallest size and prints its comparison lines."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The contract of bench/: each comparison is one `name: ours X, peer Y, ratio Z` line.
COMPARISON = re.compile(r": ours [0-9.]+.*, .*[0-9.]+.*, ratio [0-9.e+-]+x?$", re.MULTILINE)

SMALLEST = {
    "engine": "bench/engine.py --quick --only throughput --only choices --only chunked "
    "--only prefix --only structured --only hotswap",
    "kernels": "bench/kernels.py --quick",
    "refs": "bench/refs.py --no-million --lookups 20 --dulwich-lookups 2 --git-lookups 2",
    "store": "bench/store.py --quick",
    "serve": "bench/serve.py --hidden 64 --layers 2 --rank 4 --requests 4 --concurrency 2 "
    "--max-tokens 2 --repeat 1 --swaps 1 --refs 2",
}


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(SMALLEST))
def test_benchmark_runs_and_reports(bench: str) -> None:
    result = subprocess.run(
        [sys.executable, *SMALLEST[bench].split()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert COMPARISON.search(result.stdout), result.stdout[-3000:]
