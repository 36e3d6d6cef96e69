#!/usr/bin/env bash
# Fetch, on this machine, the wheels of our dependencies that the GPU machine lacks (it has torch,
# triton, peft, transformers, aiohttp, tokenizers... but no dulwich, zstandard or zlib-ng, and no
# package registry). They land in .whl/ (git-ignored through .git/info/exclude); pass ".whl" in
# the device run's `carry` and bench/gpu.sh installs them. The GPU machine's Python is 3.12.
# Versions: those of the dev venv (.venv) when it has them, else the pins below, so that the GPU
# run tests what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(dulwich==1.2.21 zstandard==0.25.0 zlib-ng==1.1.0)
PY=${PYTHON:-python3}
TARGET_PY=${TARGET_PY:-3.12}
# In a worktree .git is a file; ask git where the exclude file is, and carry on without one.
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [ -n "$exclude" ]; then
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
else
    echo "warning: not a git checkout; keep .whl/ out of commits yourself" >&2
fi
if [ -x .venv/bin/python ]; then
    mapfile -t PINS < <(.venv/bin/python - "${PINS[@]}" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name = pin.split("==")[0]
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(pin)
EOF
    )
fi
echo "fetching ${PINS[*]} for CPython $TARGET_PY"
# One version of each: two would stop the install on the GPU machine.
rm -f .whl/dulwich-*.whl .whl/zstandard-*.whl .whl/zlib_ng-*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PINS[@]}"
ls -l .whl
