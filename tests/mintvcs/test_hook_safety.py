"""Hooks against a hostile checkout: what a revision's files (or a cloned project) hold must never
run as code when mintvcs runs a hook."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mintvcs.ids import blob_id
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


def _refuses_non_finite_then_commits(work: Path, bad: float) -> None:
    """The real mintvcs.validate ran: a commit holding `bad` is refused, a finite one lands."""
    name = tensor_names(work)[0]
    set_value(work, name, 0, bad)
    refused = run(work, "commit", "-m", "non-finite")
    assert refused.returncode != 0 and "non-finite" in refused.stderr, refused.stderr
    set_value(work, name, 0, 0.5)
    result = run(work, "commit", "-m", "mine")
    assert result.returncode == 0, result.stderr


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
    _refuses_non_finite_then_commits(work, float("nan"))
    assert sorted(p.name for p in marks.iterdir()) == []


def test_an_edited_pre_commit_keeps_pythonpath_and_the_user_site(
    planted: tuple[Path, Path],
) -> None:
    # The samples ran `python -I`, which also hides PYTHONPATH and the user's site-packages
    # (where `pip install --user` puts mintvcs): an edited pre-commit refused every commit.
    # A sitecustomize on PYTHONPATH that only the hook's Python (MINT_ADAPTER_DIR set) reports.
    work, marks = planted
    site = work.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\nif 'MINT_ADAPTER_DIR' in os.environ:\n"
        f"    open(os.path.join({str(marks)!r}, 'sitecustomize'), 'w').close()\n"
    )
    pre_commit = work / ".mint" / "hooks" / "pre-commit"
    pre_commit.write_text(pre_commit.read_text() + "# our team's hook\n")
    paths = [str(site), *filter(None, ENV.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**ENV, "PYTHONPATH": os.pathsep.join(paths)}
    result = run(work, "commit", "-m", "mine", "--allow-empty", env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in marks.iterdir()) == ["sitecustomize"]


def test_an_earlier_sample_runs_as_the_current_one(planted: tuple[Path, Path]) -> None:
    # The first pre-commit sample ran `python -m mintvcs.validate` in the work tree: left as it
    # is, it is checked in-process, as the current sample is, and starts no Python.
    work, marks = planted
    pre_commit = work / ".mint" / "hooks" / "pre-commit"
    pre_commit.write_text(EARLIER_PRE_COMMIT)
    _refuses_non_finite_then_commits(work, float("inf"))
    assert sorted(p.name for p in marks.iterdir()) == []


def test_an_earlier_ref_update_sample_runs_the_current_sample(
    planted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs import hooks, porcelain

    work, marks = planted
    earlier = b"#!/bin/sh\necho earlier sample ran >&2\n"
    monkeypatch.setitem(hooks._EARLIER_SAMPLES, "ref-update", frozenset({blob_id(earlier)}))
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


# ------------------------------------------------- repositories inside another's work tree
def _marking_hooks(git_dir: Path, marks: Path, *names: str) -> None:
    """Install hooks that each leave a file named after themselves in `marks`."""
    for name in names:
        hook = git_dir / "hooks" / name
        hook.write_text(f"#!/bin/sh\necho ran > '{marks}/{name}'\n")
        hook.chmod(0o755)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True)


def test_a_cloned_project_that_tracks_a_mint_runs_none_of_its_hooks(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # git refuses to check out a .git path, not a .mint one: the clone holds a repository whose
    # hooks are executable and the victim's own.
    marks = tmp_path / "marks"
    marks.mkdir()
    model = tmp_path / "project" / "model"
    mint(tmp_path, "init", str(model), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, model)
    mint(model, "commit", "-m", "adapter", "--no-verify")
    _marking_hooks(model / ".mint", marks, "ref-update", "pre-commit", "post-commit")
    _git(model.parent, "init", "-q")
    _git(model.parent, "add", "-A")
    _git(model.parent, "commit", "-q", "-m", "a project with a model")
    victim = tmp_path / "victim"
    _git(tmp_path, "clone", "-q", (model.parent).as_uri(), str(victim))
    cloned = victim / "model"
    assert os.access(cloned / ".mint" / "hooks" / "ref-update", os.X_OK)

    result = run(cloned, "branch", "experiment")
    assert result.returncode == 0, result.stderr
    assert f"inside the work tree of the git repository at {victim}" in result.stderr
    assert f"git config --global --add mint.safeHooks {cloned}" in result.stderr
    assert "--no-verify" not in result.stderr  # it skips pre-commit and commit-msg only
    set_value(cloned, tensor_names(cloned)[0], 0, 0.25)
    refused = run(cloned, "commit", "-m", "mine")
    assert refused.returncode != 0 and "mint.safeHooks" in refused.stderr, refused.stderr
    assert "or skip hooks with --no-verify" in refused.stderr
    committed = run(cloned, "commit", "-m", "mine", "--no-verify")  # post-commit: skipped
    assert committed.returncode == 0 and "mint.safeHooks" in committed.stderr
    assert sorted(p.name for p in marks.iterdir()) == []

    # Trusted in the user's own git config, they run.
    config = tmp_path / "gitconfig"
    config.write_text(f"[mint]\n\tsafeHooks = {cloned}\n")
    result = run(cloned, "branch", "trusted", env={**ENV, "GIT_CONFIG_GLOBAL": str(config)})
    assert result.returncode == 0 and "safeHooks" not in result.stderr, result.stderr
    assert sorted(p.name for p in marks.iterdir()) == ["ref-update"]


def _committed_work(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> tuple[Path, Path]:
    """A work tree with one commit of `peft_adapter`, and an empty directory for hooks' marks."""
    marks = tmp_path / "marks"
    marks.mkdir()
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter, work)
    mint(work, "commit", "-m", "adapter", "--no-verify")
    return work, marks


def test_a_store_carried_by_a_revision_runs_none_of_its_hooks(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # A revision's extra files may lay out a store (HEAD, objects/, refs/, hooks/): found from
    # the current directory, it was opened as a repository and its hooks ran.
    work, marks = _committed_work(tmp_path, tiny_base, peft_adapter)
    shutil.copytree(work / ".mint", work / "examples")
    _marking_hooks(work / "examples", marks, "ref-update")
    (work / "HEAD").write_text("ref: refs/heads/elsewhere\n")  # and one at the top, too
    (work / "objects").mkdir()
    (work / "objects" / "README").write_text("not a store\n")
    mint(work, "commit", "-m", "with examples", "--no-verify")
    victim = tmp_path / "victim"
    _git(tmp_path, "clone", "-q", "--bare", (work / ".mint").as_uri(), str(victim / ".mint"))
    mint(victim, "checkout", "--force", "main")
    assert os.access(victim / "examples" / "hooks" / "ref-update", os.X_OK)

    result = run(victim / "examples", "branch", "try")
    assert result.returncode == 0, result.stderr
    assert f"inside the work tree of the mintvcs repository at {victim}" in result.stderr
    assert not list(marks.iterdir())
    # At the top of the work tree, the files named HEAD and objects/ are the revision's: the
    # repository is the work tree's .mint.
    log = run(victim, "log", "--oneline")
    assert log.returncode == 0 and "with examples" in log.stdout, log.stderr


def test_hooks_of_a_repository_of_ones_own_run(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # Not inside another repository's work tree: hooks run as before, warning-free.
    work, marks = _committed_work(tmp_path, tiny_base, peft_adapter)
    _marking_hooks(work / ".mint", marks, "ref-update")
    result = run(work, "checkout", "-b", "next")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
    assert [p.name for p in marks.iterdir()] == ["ref-update"]
