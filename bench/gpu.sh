#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU machine, most important first: the CUDA
# parity grid and the kernel benchmark (#3), the engine's CUDA graphs against its eager steps and
# its CUDA benchmark (#4), the server benchmark (#5). Results land in $OUT (default bench/out),
# eight files at most: gpu.txt (nvidia-smi, versions, each step's time and exit status),
# setup.log, parity.log, kernels.log, kernels.json, engine-cuda.log, serve.log, serve.json.
#
# Before the call, run bench/gpu-wheels.sh here and carry ".whl". Never run with TRITON_INTERPRET.
# Time: each step has its own limit (parity 110 s, fused-parity 45 s, engine-tests 60 s, kernels
# 90 s, engine 140 s, serve 90 s; the first three share parity.log) and none runs past
# GPU_DEADLINE_S (default 500 s) from the start, so the whole script ends within about 8.5
# minutes even when every step hangs; set-up comes first (~20 s; each wait in it is allowed up to
# 60-90 s, for a freshly booted machine's cold imports). Set-up that leaves no CUDA, no torch,
# triton or mintvcs.kernels stops the script at once with exit status 2 and setup.log printed:
# device minutes are too scarce to spend on the timeouts. A missing or too old dependency of the
# server or the engine (bench/gpu_setup.py says which) skips only the steps that import it.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
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
# The set-up's longest waits: a freshly booted machine reads torch's CUDA libraries from a cold
# disk and initialises CUDA for the first time, which may take tens of seconds.
SETUP_LIMIT=${GPU_SETUP_LIMIT_S:-90}

# Seconds a step may take: its own limit, cut to what is left before the deadline.
limit() {
    local left=$((DEADLINE - SECONDS))
    if ((left < $1)); then echo $((left > 0 ? left : 0)); else echo "$1"; fi
}

# step NAME LIMIT LOG COMMAND...: run under `timeout -k 10`, output to the terminal and LOG.
step() {
    local name=$1 want=$2 log=$3 secs rc start=$SECONDS
    shift 3
    if [[ " ${SKIP[*]} " == *" $name "* ]]; then
        echo "## $name: skipped, set-up found what it needs missing (see above)" | tee -a "$OUT/gpu.txt"
        SUMMARY+=("$name: skipped (set-up)")
        return
    fi
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
        timeout -k 5 "$SETUP_LIMIT" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target "$SITE" .whl/*.whl && echo "installed: $(cd .whl && ls -- *.whl)"
    else
        echo "no .whl/*.whl: run bench/gpu-wheels.sh here and name .whl in the run's carry"
    fi
    echo "== editable install of mintvcs (the machine's setuptools, no build isolation)"
    timeout -k 5 60 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
        echo "pip install -e . done"
} > "$OUT/setup.log" 2>&1
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# From another directory, as hooks and subprocesses import it: the editable install's finder maps
# mintvcs.serve, mintvcs.kernels and mintvcs.hook_samples onto serve/, kernels/ and hooks/.
if ! (cd /tmp && timeout -k 5 60 "$PY" -c "import mintvcs.serve, mintvcs.kernels") >> "$OUT/setup.log" 2>&1; then
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

# Versions into gpu.txt, then fail fast: no CUDA or no compiled kernels would only burn the
# steps' time limits one after another. Dependencies the server alone needs (aiohttp, click) cost
# only the steps that import them. A check that is merely slow (a fresh machine's cold imports and
# first CUDA initialisation) is no reason to stop: the steps then show what is wrong.
SKIP=()
{
    echo
    echo "== versions (PYTHONPATH=$PYTHONPATH)"
    timeout -k 5 "$SETUP_LIMIT" "$PY" bench/gpu_setup.py
} 2>&1 | tee -a "$OUT/gpu.txt"
check=${PIPESTATUS[0]}
case $check in
    0) ;;
    3) SKIP=(engine-tests serve) ;;
    4) SKIP=(engine-tests engine serve) ;;
    2)
        echo "== setup.log"
        cat "$OUT/setup.log"
        echo "## set-up failed (exit $check) after $SECONDS s: nothing measured (see above)" |
            tee -a "$OUT/gpu.txt"
        exit 2
        ;;
    124 | 137)
        echo "## set-up check slow: no answer within $SETUP_LIMIT s (exit $check); running every step" |
            tee -a "$OUT/gpu.txt"
        ;;
    *)
        echo "## set-up check broke (exit $check, see above); running every step" |
            tee -a "$OUT/gpu.txt"
        ;;
esac
echo "## set-up done at $SECONDS s" | tee -a "$OUT/gpu.txt"

# -------------------------------------------------------------------------------------- steps
# The kernels' grid first; then the engine's CUDA graphs against its eager steps (tiny model, fp32).
# The grid needs ~70 specialisations of the two kernels, ~0.5-1.5 s of Triton compiling each:
# eight pytest workers (pytest-xdist, on the GPU image; 16 cores) compile them side by side. The engine's
# GPU tests (CUDA graphs, structured outputs' masks) run in one process: each worker would
# build their engines again.
WORKERS=()
"$PY" -c "import xdist" 2> /dev/null && WORKERS=(-n 8)
step parity 110 "$OUT/parity.log" \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu "${WORKERS[@]}" --maxfail=5 --durations=10 \
    --timeout=60 tests/kernels
# The grid above calls the kernels one slice at a time, with K never a multiple of 8; the engine
# calls them with 3 slices (q/k/v) and 2 (gate/up) per layer, whose aligned loads the grid never
# takes. These tests check that path against the reference loop; they pick CUDA by themselves.
step fused-parity 45 "$OUT/parity.log" \
    "$PY" -m pytest -q -p no:cacheprovider --maxfail=5 --timeout=30 \
    tests/kernels/test_parity.py tests/kernels/test_groups.py tests/kernels/test_trusted.py \
    -k "(triton or aligned) and not parity_grid"
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
