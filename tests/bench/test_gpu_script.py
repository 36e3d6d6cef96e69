"""bench/gpu.sh's set-up on a machine without a GPU: which steps it runs, which it skips, and why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Stands in for the GPU machine's python3: the set-up check runs for real (told that no CUDA is
# fine), installs do nothing, and each step only says what it would have run.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1" in
    bench/gpu_setup.py) sleep "${{FAKE_SETUP_DELAY:-0}}"; exec {python} "$@" --no-cuda-ok ;;
    -c) exec {python} "$@" ;;
    -m) [ "$2" = pip ] && exit 1 ;;
esac
echo "RAN $*"
"""


def run_gpu_sh(tmp_path: Path, **env: str) -> tuple[int, str, str]:
    """Run bench/gpu.sh with the fake python; its exit status, gpu.txt and the steps' logs."""
    fake = tmp_path / "python3"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable))
    fake.chmod(0o755)
    out = tmp_path / "out"
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")],
        env={**os.environ, "PYTHON": str(fake), "OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    logs = "".join(path.read_text() for path in sorted(out.glob("*.log")))
    return result.returncode, (out / "gpu.txt").read_text(), logs


def old_distribution(where: Path, name: str, release: str) -> str:
    """A PYTHONPATH entry on which `name` reads as installed at version `release`."""
    info = where / f"{name}-{release}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {release}\n")
    return f"{where}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"


@pytest.mark.slow
def test_an_old_aiohttp_skips_only_the_steps_that_import_it(tmp_path: Path) -> None:
    path = old_distribution(tmp_path / "site", "aiohttp", "3.13.0")
    status, summary, logs = run_gpu_sh(tmp_path, PYTHONPATH=path)
    assert "aiohttp 3.13.0 does not satisfy 'aiohttp>=3.14'" in summary
    assert "SETUP FAILED" not in summary
    for step in ("engine-tests", "serve"):
        assert f"{step}: skipped (set-up)" in summary
    for step in ("parity", "fused-parity", "kernels", "engine"):
        assert f"\n{step}: exit 0, " in summary
    assert "RAN bench/kernels.py" in logs and "RAN bench/engine.py --only cuda" in logs
    assert "tests/kernels/test_parity.py" in logs and "bench/serve.py" not in logs
    assert status == 1  # a skipped step is not a complete run


@pytest.mark.slow
def test_a_slow_set_up_check_runs_every_step(tmp_path: Path) -> None:
    status, summary, logs = run_gpu_sh(tmp_path, GPU_SETUP_LIMIT_S="2", FAKE_SETUP_DELAY="20")
    assert "set-up check slow: no answer within 2 s" in summary
    for step in ("parity", "fused-parity", "engine-tests", "kernels", "engine", "serve"):
        assert f"\n{step}: exit 0, " in summary
    assert "RAN bench/serve.py" in logs
    assert status == 0


@pytest.mark.slow
def test_an_engine_that_does_not_import_skips_the_engine_too(tmp_path: Path) -> None:
    # An llguidance that fails at import: mintvcs.serve does not import, mintvcs.kernels does.
    site = tmp_path / "site"
    site.mkdir()
    (site / "llguidance.py").write_text('raise ImportError("no llguidance here")\n')
    path = f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    status, summary, logs = run_gpu_sh(tmp_path, PYTHONPATH=path)
    assert "import mintvcs.serve: ImportError: no llguidance here" in summary
    for step in ("engine-tests", "engine", "serve"):
        assert f"{step}: skipped (set-up)" in summary
    for step in ("parity", "fused-parity", "kernels"):
        assert f"\n{step}: exit 0, " in summary
    assert "RAN bench/engine.py" not in logs and status == 1
