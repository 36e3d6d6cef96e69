"""An engine on CPU keeps freed memory for its next step instead of faulting fresh pages in."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

# Samples 32 rows of a 128k vocabulary (Llama-3's) as a decode step does, and prints the page
# faults of the median call: each call frees and allocates ~50 MB of weights and running sums.
_SCRIPT = """
import resource, statistics, sys, torch
from mintvcs.serve import Engine, EngineConfig
from mintvcs.serve.sampling import SamplingParams, sample_rows
if sys.argv[2] == "engine":
    Engine(sys.argv[1], EngineConfig(max_model_len=64), start=False).close()
torch.set_num_threads(1)
logits = torch.randn(32, 128256)
params = [SamplingParams(seed=i, temperature=1.0, top_k=50) for i in range(32)]
generators = [torch.Generator().manual_seed(i) for i in range(32)]
faults = []
for _ in range(9):  # the first call grows the heap either way: the median says it
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    sample_rows(logits, params, generators)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(int(statistics.median(faults)))
"""


def _faults_per_call(base: Path, mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(base), mode],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc"
)
def test_an_engine_on_cpu_reuses_the_pages_its_steps_free(tiny_base: Path) -> None:
    # A fresh process each, so that no earlier allocation has moved glibc's own thresholds.
    alone = _faults_per_call(tiny_base, "alone")
    after_engine = _faults_per_call(tiny_base, "engine")
    # 50 MB of fresh pages is ~12,000 faults; reusing them, next to none.
    if alone < 5_000:
        pytest.skip(f"this malloc reuses freed pages by itself ({alone} faults per call)")
    assert after_engine < alone // 10, (alone, after_engine)
