"""Adapter validation for the sample pre-commit hook: finite values and shapes that fit the base.

`mintvcs commit` runs these same checks in-process, during encoding, when the installed
pre-commit hook is byte-identical to the shipped sample (see mintvcs.hooks.is_sample).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mintvcs.adapter import read_adapter
from mintvcs.codec import NonFiniteTensorError, nonfinite_count
from mintvcs.errors import MintError

if TYPE_CHECKING:
    from mintvcs.store import Repository

__all__ = ["NonFiniteTensorError", "check_finite", "main", "validate_adapter"]


def check_finite(name: str, dtype: str, raw: bytes | memoryview) -> None:
    """Refuse a float tensor holding NaN or Inf, naming it and counting the bad values."""
    bad = nonfinite_count(raw, dtype)
    if bad:
        raise NonFiniteTensorError(name, bad)


def validate_adapter(adapter_dir: Path, repo: Repository | None) -> None:
    """Run every check on an adapter directory."""
    adapter = read_adapter(adapter_dir)
    for index, entry in enumerate(adapter.layout.tensors):
        check_finite(entry.name, entry.dtype, adapter.tensor_bytes(index))
    if repo is not None and repo.base is not None:
        repo.base.check_adapter({t.name: (t.dtype, t.shape) for t in adapter.layout.tensors})


def main() -> int:
    """Validate MINT_ADAPTER_DIR (or argv[1]) against the repository in MINT_DIR."""
    from mintvcs.store import Repository

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
