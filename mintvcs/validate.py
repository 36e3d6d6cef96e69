"""Adapter validation for the sample pre-commit hook: finite values and shapes that fit the base."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mintvcs.adapter import read_adapter
from mintvcs.errors import MintError
from mintvcs.store import Repository

_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}


class NonFiniteTensorError(MintError):
    """A tensor holding NaN or Inf."""


def check_finite(name: str, dtype: str, raw: bytes | memoryview) -> None:
    """Refuse a float tensor holding NaN or Inf, naming it and counting the bad values."""
    import numpy as np

    if dtype not in _FLOATS:
        return
    values = np.frombuffer(raw, dtype=_FLOATS[dtype])
    if dtype == "BF16":
        # bf16 is the top half of an fp32: all-ones exponent means NaN or Inf.
        bad = int(np.count_nonzero((values & 0x7F80) == 0x7F80))
    else:
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        raise NonFiniteTensorError(f"tensor {name} holds {bad} non-finite value(s) (NaN or Inf)")


def validate_adapter(adapter_dir: Path, repo: Repository | None) -> None:
    """Run every check on an adapter directory."""
    adapter = read_adapter(adapter_dir)
    for index, entry in enumerate(adapter.layout.tensors):
        check_finite(entry.name, entry.dtype, adapter.tensor_bytes(index))
    if repo is not None and repo.base is not None:
        repo.base.check_adapter({t.name: (t.dtype, t.shape) for t in adapter.layout.tensors})


def main() -> int:
    """Validate MINT_ADAPTER_DIR (or argv[1]) against the repository in MINT_DIR."""
    target = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("MINT_ADAPTER_DIR", "."))
    git_dir = os.environ.get("MINT_DIR")
    try:
        validate_adapter(target, Repository.open(git_dir) if git_dir else None)
    except MintError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
