#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU machine, most important first: the CUDA
# parity grid and the kernel benchmark (#3), the engine's CUDA benchmark (#4), the server
# benchmark (#5). Each has a time limit so that the whole script ends inside one device call
# (10 minutes). Results land in $OUT (default bench/out), eight files at most: gpu.txt,
# setup.log, parity.log, kernels.log, kernels.json, engine-cuda.log, serve.log, serve.json.
# Before the call, run bench/gpu-wheels.sh here and carry ".whl". Never run with TRITON_INTERPRET.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/gpu.txt" 2>&1
{
    # The machine's Python has torch, triton, peft and transformers; it lacks what .whl carries.
    if ls .whl/*.whl > /dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    "$PY" -m pip install -q --no-deps --no-build-isolation -e .
} > "$OUT/setup.log" 2>&1
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$OUT/parity.log"
timeout 120 "$PY" bench/kernels.py --no-cpu --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
timeout 150 "$PY" bench/engine.py --only cuda 2>&1 | tee "$OUT/engine-cuda.log"
timeout 150 "$PY" bench/serve.py --repeat 1 --swaps 3 --json "$OUT/serve.json" 2>&1 | tee "$OUT/serve.log"
