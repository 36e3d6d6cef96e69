"""bench/gpu.sh's set-up check: versions into gpu.txt, and which steps the machine can run.

Exit status: 0 every step can run; 3 the server's dependencies are missing or too old (skip
engine-tests and serve, which import aiohttp and click); 4 the engine does not import either
(skip engine as well); 2 no CUDA, torch, triton or mintvcs.kernels: nothing can run.
The parity grid, kernel and engine benchmarks import neither aiohttp nor click, so an image
whose aiohttp is older than pyproject's pin still measures them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# Exit statuses gpu.sh maps onto the steps it skips.
ALL_STEPS, NO_SERVER, NO_ENGINE, NOTHING = 0, 3, 4, 2
# Versions worth reading on an image whose list names packages without their versions.
IMAGE_DISTS = [
    "aiohttp",
    "yarl",
    "multidict",
    "frozenlist",
    "propcache",
    "aiosignal",
    "click",
    "jinja2",
    "tqdm",
    "numpy",
    "tokenizers",
    "safetensors",
    "transformers",
    "peft",
    "packaging",
    "setuptools",
    "pytest",
    "pytest-timeout",
    "pytest-xdist",
]


def imported(module: str, dist: str | None, problems: list[str]) -> bool:
    """Import `module`, print its version and file, or add why it failed to `problems`."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        problems.append(f"import {module}: {type(e).__name__}: {e}")
        return False
    try:
        release = version(dist) if dist else ""
    except PackageNotFoundError:
        release = "(no installed metadata)"  # mintvcs through the import shim
    print(" ".join(part for part in (module, release, getattr(mod, "__file__", None)) if part))
    return True


def requirement_problems(pyproject: Path) -> list[str]:
    """Each runtime dependency of `pyproject` that is not installed at a version it allows."""
    problems = []
    with pyproject.open("rb") as f:
        lines = tomllib.load(f)["project"]["dependencies"]
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(
                f"{requirement.name} is not installed: rerun bench/gpu-wheels.sh, carry .whl"
            )
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} does not satisfy {line!r}")
    return problems


def main() -> int:
    """Print versions and problems; return the exit status that says which steps can run."""
    parser = argparse.ArgumentParser(description=__doc__)
    # Only for tests of this check and of gpu.sh on a machine without a GPU.
    parser.add_argument("--no-cuda-ok", action="store_true", help="no CUDA is not a problem")
    args = parser.parse_args()
    print("python", sys.version.split()[0], sys.executable)
    fatal: list[str] = []
    try:
        import torch

        print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            print(
                f"GPU {props.name}, sm_{props.major}{props.minor},"
                f" {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs,"
                f" {torch.cuda.device_count()} device(s)"
            )
        elif not args.no_cuda_ok:
            fatal.append("torch.cuda.is_available() is False: no GPU for the compiled kernels")
    except Exception as e:
        fatal.append(f"import torch: {type(e).__name__}: {e}")
    try:
        import triton

        print("triton", triton.__version__)
    except Exception as e:
        fatal.append(f"import triton: {type(e).__name__}: {e}")
    imported("mintvcs.kernels", "mintvcs", fatal)
    for dist in IMAGE_DISTS:
        try:
            print(f"  {dist}=={version(dist)}")
        except PackageNotFoundError:
            print(f"  {dist}: not installed")
    engine: list[str] = []
    for module, dist in [
        ("mintvcs.serve", None),
        ("dulwich", "dulwich"),
        ("zstandard", "zstandard"),
        ("zlib_ng", "zlib-ng"),
        ("llguidance", "llguidance"),
    ]:
        imported(module, dist, engine)
    # Every runtime dependency pyproject names, installed at a version it allows: one added since
    # bench/gpu-wheels.sh last ran, or the image's own older copy, fails the server at import.
    server = requirement_problems(ROOT / "pyproject.toml")
    for module, dist in [("aiohttp", "aiohttp"), ("click", "click"), ("mintvcs.serve.app", None)]:
        imported(module, dist, server)
    if fatal:
        print("SETUP FAILED:", *fatal, *engine, *server, sep="\n  ")
        return NOTHING
    if engine:
        print("SKIPPING engine, engine-tests and serve:", *engine, *server, sep="\n  ")
        return NO_ENGINE
    if server:
        print("SKIPPING engine-tests and serve:", *server, sep="\n  ")
        return NO_SERVER
    print("set-up OK")
    return ALL_STEPS


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
