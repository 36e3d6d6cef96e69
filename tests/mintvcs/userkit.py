"""Run mintvcs and git as other Unix users, for the tests of a repository several users share.

The tests run as root (CI does), and become a user by number through setpriv: no account is
made. That user must reach the Python running the tests, which may sit under a directory
only root may enter (a pyenv in root's home): each command then runs in a mount namespace of
its own where that directory is covered by an empty one holding only the way to what is
needed, bound in from its real place. Nothing outside the test's own temporary directory changes, and the
mounts end with the command.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mintvcs.storekit import ENV, ROOT


@dataclass(frozen=True)
class User:
    """A Unix user by number: primary group `gid`, no other group."""

    name: str
    uid: int
    gid: int


TEAM = 43100  # the group that shares the repository
ALICE = User("alice", 43101, TEAM)
BOB = User("bob", 43102, TEAM)
CAROL = User("carol", 43103, 43199)  # not in the team


# Where a login name is looked for before the password database: root's, not the test user's.
_NAME_VARIABLES = ("LOGNAME", "USER", "LNAME", "USERNAME")


def _other_may_enter(path: Path) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IXOTH)


def _cover_script(stage: Path) -> str:
    """Shell lines (run as root in a fresh mount namespace) that make the Python running the
    tests, its virtualenv and this checkout reachable by any user; '' when they are already."""
    targets: list[Path] = []
    for path in (Path(sys.base_prefix), Path(sys.prefix), ROOT):
        path = path.resolve()
        if not any(path.is_relative_to(t) for t in targets):
            targets = [t for t in targets if not t.is_relative_to(path)] + [path]
    covers: dict[Path, list[Path]] = {}
    for target in targets:
        for folder in [*reversed(target.parents), target]:
            if not _other_may_enter(folder):
                if folder == target:
                    pytest.skip(f"{target} may not be entered by other users")
                covers.setdefault(folder, []).append(target)
                break
    saves, binds, backs = [], [], []
    for i, (folder, inside) in enumerate(covers.items()):
        cover = stage / f"cover{i}"
        for j, target in enumerate(inside):
            save = stage / f"save{i}-{j}"
            save.mkdir()
            (cover / target.relative_to(folder)).mkdir(parents=True)
            saves.append(f"mount --bind '{target}' '{save}'")
            backs.append(f"mount --bind '{save}' '{target}'")
        cover.mkdir(exist_ok=True)
        binds.append(f"mount --bind '{cover}' '{folder}'")
    for made, _dirs, _files in os.walk(stage):
        os.chmod(made, 0o755)
    return " && ".join([*saves, *binds, *backs])


@dataclass
class Users:
    """Runs commands as ALICE, BOB or CAROL in `place`, a directory every one of them may write."""

    place: Path
    script: str

    def run(
        self, user: User, umask: int, cwd: Path, argv: list[str], *, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` as `user` with `umask`, in `cwd`; exit 0 expected unless ok=False."""
        become = [
            "setpriv",
            f"--reuid={user.uid}",
            f"--regid={user.gid}",
            "--clear-groups",
            "--",
            *argv,
        ]
        command = become
        if self.script:
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                f'{self.script} && exec "$@"',
                "sh",
                *become,
            ]
        env = {
            **{k: v for k, v in ENV.items() if k not in _NAME_VARIABLES},
            "HOME": str(self.place),
            "PYTHONDONTWRITEBYTECODE": "1",
            # git refuses a repository another user owns unless told it is safe.
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "safe.directory",
            "GIT_CONFIG_VALUE_0": "*",
            "GIT_AUTHOR_NAME": user.name,
            "GIT_COMMITTER_NAME": user.name,
        }
        result = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            umask=umask,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert "Traceback" not in result.stderr, f"{user.name}: {argv} raised:\n{result.stderr}"
        if ok:
            assert result.returncode == 0, (
                f"{user.name} (umask {umask:03o}): {' '.join(argv)} exited "
                f"{result.returncode}:\n{result.stdout}\n{result.stderr}"
            )
        return result

    def mint(
        self, user: User, umask: int, cwd: Path, *args: str, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run `mintvcs ARGS` as `user`."""
        return self.run(user, umask, cwd, [sys.executable, "-m", "mintvcs.cli", *args], ok=ok)

    def git(
        self, user: User, umask: int, cwd: Path, *args: str, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run real git as `user`."""
        return self.run(user, umask, cwd, ["git", *args], ok=ok)


@contextmanager
def other_users() -> Iterator[Users]:
    """Users for one test, in a temporary directory of the system's that each may write (the
    pytest one is root's alone); skipped where root cannot become them."""
    if os.geteuid() != 0:
        pytest.skip("running commands as other users needs root (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("running commands as other users needs setpriv (util-linux)")
    place = Path(tempfile.mkdtemp(prefix="mint-users-"))
    try:
        place.chmod(0o777)
        stage = place / ".stage"
        stage.mkdir()
        script = _cover_script(stage)
        if script and shutil.which("unshare") is None:
            pytest.skip("Python is in a directory other users may not enter, and no unshare")
        users = Users(place, script)
        probe = users.run(
            ALICE, 0o022, place, [sys.executable, "-c", "import mintvcs.cli"], ok=False
        )
        if probe.returncode != 0:
            pytest.skip(f"another user cannot run this Python and mintvcs: {probe.stderr[-300:]}")
        yield users
    finally:
        shutil.rmtree(place, ignore_errors=True)


# Where git and mintvcs keep the same kind of file, with the modes they must agree on.
_KINDS = (
    (
        "object",
        re.compile(r"objects/([0-9a-f]{2}/[0-9a-f]{38}|pack/pack-[0-9a-f]{40}\.(pack|idx))"),
    ),
    ("ref", re.compile(r"HEAD|packed-refs|(refs|logs)/.+")),
    ("config", re.compile(r"config|description|info/[^/]+")),
    ("hook", re.compile(r"hooks/[^/]+")),
)


def modes_by_kind(git_dir: Path) -> dict[str, set[int]]:
    """The modes found in a git directory, by kind: every directory, objects and packs, refs
    and reflogs, config-like files, hooks; and mintvcs's own `mint-*` files."""
    found: dict[str, set[int]] = {}
    for folder, dirs, files in os.walk(git_dir):
        for name in dirs:
            found.setdefault("directory", set()).add(
                stat.S_IMODE(os.stat(Path(folder, name)).st_mode)
            )
        for name in files:
            path = Path(folder, name)
            rel = path.relative_to(git_dir).as_posix()
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if rel.startswith("mint-"):
                found.setdefault("mint", set()).add(mode)
            for kind, pattern in _KINDS:
                if pattern.fullmatch(rel):
                    found.setdefault(kind, set()).add(mode)
    found.setdefault("directory", set()).add(stat.S_IMODE(os.stat(git_dir).st_mode))
    return found


def assert_modes_as_git(mint_dir: Path, git_dir: Path) -> None:
    """Every kind of file mintvcs wrote has the modes git gave the same kind in the same setup;
    its `mint-*` files have those of git's config."""
    ours, gits = modes_by_kind(mint_dir), modes_by_kind(git_dir)
    wrong = {
        kind: (sorted(map(oct, modes)), sorted(map(oct, gits.get(kind, set()))))
        for kind, modes in ours.items()
        if modes != gits.get("config" if kind == "mint" else kind, modes)
    }
    assert not wrong, f"modes (mintvcs, git) that differ: {wrong}"
