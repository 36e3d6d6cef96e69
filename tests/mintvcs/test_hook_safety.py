"""Hooks against a hostile checkout: what a revision's files (or a cloned project) hold must never
run as code when mintvcs runs a hook."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.mintvcs.storekit import (
    ENV,
    copy_adapter,
    git,
    mint,
    set_value,
    tensor_names,
)

# Each planted module writes a file named after itself into the directory MARKS names.
PAYLOAD = "import os\nopen(os.path.join({marks!r}, {name!r}), 'w').write(__file__)\n"
# `mintvcs ARGS` as the console script starts it: the current directory (the work tree) is not on
# sys.path, so only the hooks could pick up what the work tree holds. (`python -m mintvcs.cli`
# in the work tree would import the planted `json.py` itself.)
MINT = (
    "import sys\nif sys.path and sys.path[0] == '':\n    del sys.path[0]\n"
    "from mintvcs.cli import main\nsys.exit(main(prog_name='mintvcs'))\n"
)
# The first shipped pre-commit sample, byte for byte: it ran Python without -I.
EARLIER_PRE_COMMIT = (
    "#!/bin/sh\n"
    "# mintvcs sample pre-commit hook, installed by `mintvcs init`.\n"
    "# Refuses an adapter holding NaN/Inf values, or whose shapes do not fit the recorded base model.\n"
    "# mintvcs runs it with MINT_ADAPTER_DIR (the adapter being committed), MINT_DIR (the .mint\n"
    "# directory) and MINT_PYTHON (the Python that runs mintvcs) in the environment.\n"
    'exec "${MINT_PYTHON:-python3}" -m mintvcs.validate "${MINT_ADAPTER_DIR:-.}"\n'
)


def run(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MINT, *args],
        cwd=cwd,
        env=env or ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def isolated_python_finds_mintvcs() -> bool:
    """The samples run `python -I`: mintvcs must be installed (a virtualenv, editable or not)."""
    probe = [sys.executable, "-I", "-c", "import mintvcs"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.fixture
def planted(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> tuple[Path, Path]:
    """A work tree whose checked-out revision holds `json.py`, `mintvcs/__init__.py` and
    `mintvcs/validate.py` as extra files, and an empty directory for what they would write."""
    marks = tmp_path / "marks"
    marks.mkdir()
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    (work / "mintvcs").mkdir()
    for name in ("json.py", "mintvcs/__init__.py", "mintvcs/validate.py"):
        (work / name).write_text(PAYLOAD.format(marks=str(marks), name=name.replace("/", ".")))
    result = run(work, "commit", "-m", "helpers", "--no-verify")
    assert result.returncode == 0, result.stderr
    assert "mintvcs/validate.py" in run(work, "show", "HEAD").stdout
    return work, marks


@pytest.mark.skipif(not isolated_python_finds_mintvcs(), reason="mintvcs is not installed")
def test_sample_hooks_import_nothing_from_the_work_tree(planted: tuple[Path, Path]) -> None:
    work, marks = planted
    hooks = work / ".mint" / "hooks"
    # ref-update, installed as docs/http.md says; a notify URL nobody answers shows that it ran.
    (hooks / "ref-update").write_bytes((hooks / "ref-update.sample").read_bytes())
    (hooks / "ref-update").chmod(0o755)
    env = {**ENV, "MINT_NOTIFY_URL": "http://127.0.0.1:9"}
    for args in (("branch", "try-it"), ("tag", "reviewed"), ("checkout", "-b", "other")):
        result = run(work, *args, env=env)
        assert result.returncode == 0, result.stderr
        assert "cannot notify http://127.0.0.1:9" in result.stderr, result.stderr
    (hooks / "ref-update").unlink()
    # pre-commit edited (so it runs as a program): it validates with the real mintvcs.validate.
    pre_commit = hooks / "pre-commit"
    pre_commit.write_text(pre_commit.read_text() + "# our team's hook\n")
    name = tensor_names(work)[0]
    set_value(work, name, 0, float("nan"))
    refused = run(work, "commit", "-m", "nan")
    assert refused.returncode != 0 and "non-finite" in refused.stderr, refused.stderr
    set_value(work, name, 0, 0.5)
    result = run(work, "commit", "-m", "mine")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in marks.iterdir()) == []


def test_an_earlier_sample_runs_as_the_current_one(planted: tuple[Path, Path]) -> None:
    # The first pre-commit sample ran `python -m mintvcs.validate` in the work tree: left as it
    # is, it is checked in-process, as the current sample is, and starts no Python.
    work, marks = planted
    pre_commit = work / ".mint" / "hooks" / "pre-commit"
    pre_commit.write_text(EARLIER_PRE_COMMIT)
    name = tensor_names(work)[0]
    set_value(work, name, 0, float("inf"))
    refused = run(work, "commit", "-m", "inf")
    assert refused.returncode != 0 and "non-finite" in refused.stderr, refused.stderr
    set_value(work, name, 0, 0.5)
    result = run(work, "commit", "-m", "mine")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in marks.iterdir()) == []


def test_an_earlier_ref_update_sample_runs_the_current_sample(
    planted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs import hooks, porcelain

    work, marks = planted
    earlier = b"#!/bin/sh\necho earlier sample ran >&2\n"
    monkeypatch.setitem(hooks._EARLIER_SAMPLES, "ref-update", frozenset({hooks._blob_id(earlier)}))
    monkeypatch.setattr(hooks, "_sample_bytes", lambda name: b'echo "current sample: $1" >&2\n')
    hook = work / ".mint" / "hooks" / "ref-update"
    hook.write_bytes(earlier)
    hook.chmod(0o755)
    out = _stderr_of(lambda: porcelain.branch_create(work, "b"))
    assert "current sample: refs/heads/b" in out and "earlier" not in out
    hook.write_bytes(earlier + b"# edited\n")  # no longer the sample: it runs as it is
    assert "earlier sample ran" in _stderr_of(lambda: porcelain.branch_create(work, "c"))
    assert not list(marks.iterdir())


def _stderr_of(call: object) -> str:
    import contextlib
    import io

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        call()  # type: ignore[operator]
    return captured.getvalue()


def test_background_gc_imports_nothing_from_the_repository_directory(
    planted: tuple[Path, Path],
) -> None:
    # gc --auto starts `python -c` twice in .mint; a .mint that came from elsewhere (a project
    # that tracks one) may hold modules of its own.
    from mintvcs.maintenance import start_auto_gc
    from mintvcs.store import Repository

    work, marks = planted
    git_dir = work / ".mint"
    for name in ("subprocess.py", "mintvcs/__init__.py", "mintvcs/cli.py"):
        (git_dir / name).parent.mkdir(exist_ok=True)
        (git_dir / name).write_text(PAYLOAD.format(marks=str(marks), name=name))
    git(git_dir, "config", "gc.auto", "1")
    assert list((git_dir / "objects").glob("??/*"))
    with Repository.open(work) as repo:
        start_auto_gc(repo)
    deadline = time.monotonic() + 60
    # Done when the real gc packed every loose object and let go of its lock.
    while list((git_dir / "objects").glob("??/*")) or (git_dir / "gc.pid").exists():
        assert time.monotonic() < deadline, "the background gc did not run"
        time.sleep(0.05)
    assert sorted(p.name for p in marks.iterdir()) == []
