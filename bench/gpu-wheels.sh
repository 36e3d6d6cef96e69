#!/usr/bin/env bash
# Fetch, on this machine, the wheels of our dependencies that the GPU machine lacks (it has torch,
# triton, peft, transformers, aiohttp, tokenizers... but no dulwich, zstandard or zlib-ng, and no
# package registry). They land in .whl/ (git-ignored through .git/info/exclude); pass ".whl" in
# the device run's `carry` and bench/gpu.sh installs them. The GPU machine's Python is 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl dulwich zstandard zlib-ng
ls -l .whl
