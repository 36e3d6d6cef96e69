#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU machine, most important first: the CUDA
# parity grid and the kernel benchmark (#3), the engine's CUDA graphs against its eager steps and
# its CUDA benchmark (#4), the server benchmark (#5). Results land in $OUT (default bench/out),
# eight files at most: gpu.txt (nvidia-smi, versions, each step's time and exit status),
# setup.log, parity.log, kernels.log, kernels.json, engine-cuda.log, serve.log, serve.json.
#
# Before the call, run bench/gpu-wheels.sh here and carry ".whl". Never run with TRITON_INTERPRET.
# Time: each step has its own limit (parity 110 s, engine-tests 60 s, kernels 90 s, engine
# 140 s, serve 90 s; parity and engine-tests share parity.log) and
# none runs past GPU_DEADLINE_S (default 500 s) from the start, so the whole script ends within
# about 8.5 minutes even when every step hangs; ~20 s of set-up comes first. Set-up that leaves
# no CUDA, no importable mintvcs, or a runtime dependency of pyproject.toml uninstalled stops the
# script at once with exit status 2 and setup.log printed: device minutes are too scarce to spend
# on the timeouts.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
rm -f "$OUT"/{parity,kernels,engine-cuda,serve}.log "$OUT"/{kernels,serve}.json # a reused OUT keeps no old result
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEADLINE=${GPU_DEADLINE_S:-500}
SITE=/tmp/mintvcs-gpu-site
SHIM=/tmp/mintvcs-gpu-shim
SUMMARY=()

# Seconds a step may take: its own limit, cut to what is left before the deadline.
limit() {
    local left=$((DEADLINE - SECONDS))
    if ((left < $1)); then echo $((left > 0 ? left : 0)); else echo "$1"; fi
}

# step NAME LIMIT LOG COMMAND...: run under `timeout -k 10`, output to the terminal and LOG.
step() {
    local name=$1 want=$2 log=$3 secs rc start=$SECONDS
    shift 3
    secs=$(limit "$want")
    if ((secs < 10)); then
        echo "## $name: skipped, the ${DEADLINE} s deadline is near" | tee -a "$OUT/gpu.txt"
        SUMMARY+=("$name: skipped (deadline)")
        return
    fi
    echo "## $name (limit $secs s, at $SECONDS s)"
    timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$log" # -a: two steps may share a log
    rc=$?
    local what="exit $rc"
    ((rc == 124 || rc == 137)) && what="TIMED OUT after $secs s (exit $rc)"
    SUMMARY+=("$name: $what, $((SECONDS - start)) s")
    echo "## $name: $what, $((SECONDS - start)) s"
}

timeout -k 5 10 nvidia-smi > "$OUT/gpu.txt" 2>&1 || echo "nvidia-smi failed (exit $?)" >> "$OUT/gpu.txt"

# ------------------------------------------------------------------------------------- set-up
# The machine's Python has torch, triton, peft and transformers; it lacks what .whl carries, and
# it has no network: every install is --no-index.
{
    echo "== wheels from .whl into $SITE"
    if ls .whl/*.whl > /dev/null 2>&1; then
        timeout -k 5 15 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl && echo "installed: $(cd .whl && ls -- *.whl)"
    else
        echo "no .whl/*.whl: run bench/gpu-wheels.sh here and name .whl in the run's carry"
    fi
    echo "== editable install of mintvcs (the machine's setuptools, no build isolation)"
    timeout -k 5 25 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
        echo "pip install -e . done"
} > "$OUT/setup.log" 2>&1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# From another directory, as hooks and subprocesses import it: the editable install's finder maps
# mintvcs.serve, mintvcs.kernels and mintvcs.hook_samples onto serve/, kernels/ and hooks/.
if ! (cd /tmp && timeout -k 5 15 "$PY" -c "import mintvcs.serve, mintvcs.kernels") >> "$OUT/setup.log" 2>&1; then
    # The same mapping without pip: a finder that sitecustomize installs in every Python started
    # with this PYTHONPATH (the server and hook subprocesses too). bench/ scripts put the repo
    # first on sys.path, where mintvcs/ has no serve/, so a plain PYTHONPATH folder would not do.
    echo "== editable install unusable: falling back to the import shim in $SHIM" >> "$OUT/setup.log"
    mkdir -p "$SHIM"
    cat > "$SHIM/sitecustomize.py" << EOF
"""bench/gpu.sh's fallback for pip install -e: import mintvcs.* from $ROOT as pyproject maps it."""
import importlib.util
import sys

_ROOT = "$ROOT"
_MAP = {
    "mintvcs": _ROOT + "/mintvcs",
    "mintvcs.serve": _ROOT + "/serve",
    "mintvcs.kernels": _ROOT + "/kernels",
    "mintvcs.hook_samples": _ROOT + "/hooks",
}


class _MintvcsFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        where = _MAP.get(name)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(
            name, where + "/__init__.py", submodule_search_locations=[where]
        )


sys.meta_path.insert(0, _MintvcsFinder)
EOF
    export PYTHONPATH=$SHIM:$PYTHONPATH
fi

# Versions into gpu.txt, then fail fast: a missing import or no CUDA would only burn the
# steps' time limits one after another.
{
    echo
    echo "== versions (PYTHONPATH=$PYTHONPATH)"
    timeout -k 5 25 "$PY" - << 'EOF'
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

print("python", sys.version.split()[0], sys.executable)
problems = []
try:
    import torch

    print("torch", torch.__version__, "built for CUDA", torch.version.cuda)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        print(f"GPU {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB,"
              f" {props.multi_processor_count} SMs, {torch.cuda.device_count()} device(s)")
    else:
        problems.append("torch.cuda.is_available() is False: no GPU for the compiled kernels")
except Exception as e:
    problems.append(f"import torch: {type(e).__name__}: {e}")
try:
    import triton

    print("triton", triton.__version__)
except Exception as e:
    problems.append(f"import triton: {type(e).__name__}: {e}")
for module, dist in [("mintvcs.kernels", "mintvcs"), ("mintvcs.serve", None), ("dulwich", "dulwich"),
                     ("zstandard", "zstandard"), ("zlib_ng", "zlib-ng"), ("llguidance", "llguidance")]:
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        problems.append(f"import {module}: {type(e).__name__}: {e}")
        continue
    try:
        release = version(dist) if dist else ""
    except PackageNotFoundError:
        release = "(no installed metadata)"  # mintvcs through the import shim
    print(" ".join(part for part in (module, release, mod.__file__) if part))
# Every runtime dependency pyproject names, installed: one added since bench/gpu-wheels.sh last
# ran would otherwise fail a step minutes in, at its first import.
import tomllib

from packaging.requirements import Requirement

with open("pyproject.toml", "rb") as f:
    for line in tomllib.load(f)["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            problems.append(f"{requirement.name} is not installed: rerun bench/gpu-wheels.sh, carry .whl")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} does not satisfy {line!r}")
if problems:
    print("SETUP FAILED:", *problems, sep="\n  ")
    sys.exit(2)
print("set-up OK")
EOF
} 2>&1 | tee -a "$OUT/gpu.txt"
check=${PIPESTATUS[0]}
if ((check != 0)); then
    echo "== setup.log"
    cat "$OUT/setup.log"
    echo "## set-up failed (exit $check) after $SECONDS s: nothing measured (see above)" |
        tee -a "$OUT/gpu.txt"
    exit 2
fi
echo "## set-up done at $SECONDS s" | tee -a "$OUT/gpu.txt"

# -------------------------------------------------------------------------------------- steps
# The kernels' grid first; then the engine's CUDA graphs against its eager steps (tiny model, fp32).
# The grid needs ~70 specialisations of the two kernels, ~0.5-1.5 s of Triton compiling each:
# four pytest workers (pytest-xdist, on the GPU image) compile them side by side. The engine's
# GPU tests (CUDA graphs, structured outputs' masks) run in one process: each worker would
# build their engines again.
WORKERS=()
"$PY" -c "import xdist" 2> /dev/null && WORKERS=(-n 4)
step parity 110 "$OUT/parity.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu "${WORKERS[@]}" --maxfail=5 --durations=10 \
    --timeout=60 tests/kernels
step engine-tests 60 "$OUT/parity.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --maxfail=3 --durations=5 --timeout=50 \
    tests/serve
step kernels 90 "$OUT/kernels.log" \
    "$PY" bench/kernels.py --no-cpu --skip-parity --json "$OUT/kernels.json"
step engine 140 "$OUT/engine-cuda.log" "$PY" bench/engine.py --only cuda
step serve 90 "$OUT/serve.log" \
    "$PY" bench/serve.py --repeat 1 --swaps 3 --json "$OUT/serve.json"

rm -f "$OUT"/*.tmp # a write cut off by a timeout: only eight files come back
{
    echo
    echo "== steps (total $SECONDS s)"
    printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$OUT/gpu.txt"
for line in "${SUMMARY[@]}"; do
    [[ $line == *": exit 0, "* ]] || exit 1
done
