#!/usr/bin/env bash
# Every GPU check in one run, for a session lent a GPU machine: the CUDA parity grid, the kernel
# benchmark and the engine's CUDA benchmark. Results land in $OUT (default bench/out):
# gpu.txt, parity.log, kernels.log, kernels.json, engine-cuda.log. Never run with TRITON_INTERPRET.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/gpu.txt" 2>&1
# The machine's Python already has torch and triton; install only our package, without deps.
"$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
"$PY" -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$OUT/parity.log"
"$PY" bench/kernels.py --no-cpu --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
"$PY" bench/engine.py --only cuda 2>&1 | tee "$OUT/engine-cuda.log"
