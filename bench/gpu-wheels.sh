#!/usr/bin/env bash
# Fetch, on this machine, the wheels of our runtime dependencies that the GPU machine lacks (it has
# no package registry). They land in .whl/ (git-ignored through .git/info/exclude); pass ".whl" in
# the device run's `carry` and bench/gpu.sh installs them. The GPU machine's Python is 3.12.
# What to fetch follows pyproject.toml: every runtime dependency except those the GPU image ships
# (GPU_IMAGE_HAS below, from the device tool's list of the image's packages), so a dependency
# added to pyproject is fetched without anyone remembering this script, and with them everything
# they need in turn (aiohttp's yarl, multidict, frozenlist...): the image has some of those too,
# at versions nobody read, and an older yarl would fail aiohttp at import. Versions: those of
# the dev venv (.venv), so that the GPU run tests what CI tests; unpinned where the venv lacks one.
# aiohttp and click are on the image as well, but at unread versions that may be older than
# pyproject's bounds (aiohttp>=3.14 for web.RequestKey), so they are fetched too (~3 MB).
# Platforms up to glibc 2.34: the GPU image's Python 3.12.3 is a distribution build with a newer glibc.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_IMAGE_HAS=(torch triton safetensors numpy tqdm tokenizers jinja2)
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
VENV_PY=$PY
[ -x .venv/bin/python ] && VENV_PY=.venv/bin/python
mapfile -t PINS < <("$VENV_PY" - "$TARGET_PY" "${GPU_IMAGE_HAS[@]}" <<'PYEOF'
import re
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, requires, version

from packaging.requirements import Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


target_py, image = sys.argv[1], {canonical(name) for name in sys.argv[2:]}
# Markers as the GPU machine would evaluate them (CPython on x86-64 Linux), not as this one would.
target = {
    "python_version": target_py,
    "python_full_version": target_py + ".0",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "extra": "",
}
with open("pyproject.toml", "rb") as f:
    todo = [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]
seen = set()
while todo:
    requirement = todo.pop(0)
    name = canonical(requirement.name)
    if name in image or name in seen:
        continue
    if requirement.marker is not None and not requirement.marker.evaluate(target):
        continue
    seen.add(name)
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        print(f"{name}{requirement.specifier}")  # pyproject's own bounds, without a marker
        continue
    todo += [Requirement(line) for line in requires(name) or []]
PYEOF
)
if ((${#PINS[@]} == 0)); then
    echo "error: no requirements read from pyproject.toml (this needs Python 3.11 or later)" >&2
    exit 1
fi
echo "fetching ${PINS[*]} for CPython $TARGET_PY"
# The folder is this script's: a wheel left from an earlier run (a dependency since dropped, or
# now on the image) would be installed over the image's copy.
rm -f .whl/*.whl
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${PINS[@]}"
ls -l .whl
