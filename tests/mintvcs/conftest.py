"""A repository built once per module with the CLI: three revisions on main and a branch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.mintvcs.storekit import copy_adapter, mint, mutate


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, peft_adapter: Path) -> Path:
    """A repository with three revisions on main and a branch, every object loose; built once."""
    work = tmp_path_factory.mktemp("built") / "work"
    mint(work.parent, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    mint(work, "commit", "-m", "rev 0", "--no-verify")
    for seed in (1, 2):
        mutate(work, seed=seed)
        mint(work, "commit", "-m", f"rev {seed}", "--no-verify")
    mint(work, "branch", "side", "HEAD~1")
    return work


@pytest.fixture
def work(built: Path, tmp_path: Path) -> Path:
    """A private copy of the built repository (modes and mtimes kept), for one test to damage."""
    copy = tmp_path / "work"
    shutil.copytree(built, copy)
    return copy
