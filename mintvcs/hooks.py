"""Repository hooks in `.mint/hooks/`, run as git runs its own."""

from __future__ import annotations

import errno
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from mintvcs.errors import MintError
from mintvcs.filemodes import file_mode, make_dir
from mintvcs.ids import blob_id

if TYPE_CHECKING:
    from dulwich.file import SharedPerm

# Samples shipped in the `hooks/` directory of the source tree (package `mintvcs.hook_samples`).
SAMPLES = ("pre-commit", "commit-msg", "post-commit", "ref-update", "update")
# update acts only on `git push` into the repository (git runs it; mintvcs never does).
INSTALLED_BY_INIT = ("pre-commit", "update")
# Earlier shipped versions of the samples that start Python, by git blob id. Most ran it with
# the work tree (whose files a checked-out revision chooses) first on sys.path, so a `json.py`
# or `mintvcs/validate.py` there ran in their place; the last ran it with -I, which also hid the
# user's site-packages (a `pip install --user`). One still installed unmodified runs as the
# current sample: pre-commit in-process, ref-update from the package.
_EARLIER_SAMPLES = {
    "pre-commit": frozenset(
        {
            "846d5b701e36d73c8698075f0de15d651e45b6a8",
            "be295d6060acf472ad42786e330b85ab73a5cbff",
            "577b2e8207ee59f53ad96a6cd962558a55e7bc99",
        }
    ),
    "ref-update": frozenset(
        {
            "2c1ac8cea1d9697b3af01f100776f455398232e2",
            "3799b659a17b762e16c61cf44b902ba7fbeceff4",
            "aac773063e72e40515c905cb566e14027fcb5d87",
            "b617ff34a057ae8fcd8c26e3b8d917cea06b1690",
            "b00acf56acca5cd4a31bbc42224aa568174cf52f",
            "1b3d05c2df04ec4e461665c792c57e9345f7ad4d",
            "b7977deb3ebdd06b8c21cb63db2ad843df26de0e",
            "d4b82712a2f856fd08b8f8fdc2e80605e4877e17",
        }
    ),
}


class HookRefusedError(MintError):
    """A pre-commit or commit-msg hook exited non-zero."""


# git's variables that place a repository (its local_repo_env, and GIT_NAMESPACE): mintvcs
# ignores them, so where the shell set them they name another repository, whose objects or index
# a hook's `git` would read or write.
_REPOSITORY_ENV = (
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_CONFIG",
    "GIT_DIR",
    "GIT_GRAFT_FILE",
    "GIT_IMPLICIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_NAMESPACE",
    "GIT_NO_REPLACE_OBJECTS",
    "GIT_OBJECT_DIRECTORY",
    "GIT_PREFIX",
    "GIT_REPLACE_REF_BASE",
    "GIT_SHALLOW_FILE",
    "GIT_WORK_TREE",
)


def hook_env(git_dir: Path, adapter_dir: Path | None = None) -> dict[str, str]:
    """The environment hooks get: where the repository and adapter are, and which Python runs mintvcs."""
    env = {k: v for k, v in os.environ.items() if k not in _REPOSITORY_ENV}
    # Absolute: hooks run in the work tree, not where mintvcs was started (`--from ../x`).
    env["MINT_DIR"] = os.path.abspath(git_dir)
    # As git exports GIT_DIR to its hooks: a hook's `git` reads this store, and nothing else.
    env["GIT_DIR"] = env["MINT_DIR"]
    env["MINT_PYTHON"] = sys.executable
    if adapter_dir is not None:
        env["MINT_ADAPTER_DIR"] = os.path.abspath(adapter_dir)
    return env


def is_active(git_dir: Path, name: str, *, hint: bool = False) -> bool:
    """True when `.mint/hooks/NAME` exists and is executable, so run_hook would run it.

    With `hint`, one that exists but cannot run is named on stderr, as git does, not skipped silently.
    """
    path = git_dir / "hooks" / name
    if os.access(path, os.X_OK) and path.is_file():
        return True
    if hint and path.is_file():
        sys.stderr.write(
            f"hint: the '{path}' hook was ignored because it is not set as executable "
            f"(chmod +x it to run it)\n"
        )
    return False


def run_hook(
    git_dir: Path,
    name: str,
    args: list[str],
    env: dict[str, str],
    *,
    may_refuse: bool,
    work_tree: Path | None = None,
) -> None:
    """Run `.mint/hooks/NAME` if it exists and is executable; a refusal raises when the hook may refuse.

    It runs in `work_tree`, as git runs hooks at the top of the work tree: where `.mint` is a
    gitfile, the store's parent is another directory. Without one, in the store's parent.
    """
    path = git_dir / "hooks" / name
    cwd = git_dir.parent if work_tree is None else work_tree
    if not is_active(git_dir, name, hint=True):
        return
    try:
        _refuse_foreign(git_dir, path)
        _refuse_nested(git_dir, path)
    except (ForeignRepositoryError, NestedRepositoryError) as err:
        if may_refuse:
            raise
        sys.stderr.write(f"warning: {err}\n")  # after the fact: what it would report is done
        return
    argv = [str(path), *args]
    if (current := _instead_of_earlier_sample(path, name)) is not None:
        argv = ["/bin/sh", "-c", current.decode(), str(path), *args]  # $0 is the hook's path
    try:
        code, last = _run_streaming(argv, env, cwd)
    except OSError as err:
        if err.errno == errno.ENOEXEC:  # no #! line: as git, the shell runs it
            code, last = _run_streaming(["/bin/sh", str(path), *args], env, cwd)
        else:
            if may_refuse:
                raise refusal(name, f"it could not run ({err.strerror})") from None
            sys.stderr.write(f"warning: the {name} hook could not run ({err.strerror})\n")
            return
    if code != 0 and may_refuse:
        # Everything the hook said went out as git shows it, but its last line: that one goes
        # into the error.
        raise refusal(name, last or f"exit status {code}")
    if last:
        sys.stderr.write(last + "\n")


def _run_streaming(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run a hook as git does: stdin from /dev/null, stdout and stderr as one stream sent on to
    our stderr as it comes (a hung hook shows what it said; a flood is not held in memory),
    undecodable bytes replaced. Returns its exit status and its last line, held back for the
    caller. Only the hook is waited for: a job it left running may keep the stream open."""
    import subprocess  # ~5 ms: only when a hook runs
    import threading

    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lock = threading.Lock()
    held: list[str] = []  # the last line so far, until the caller takes it
    taken = threading.Event()  # after that, a job the hook left running writes straight through

    def forward() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line.strip():
                continue
            with lock:
                if taken.is_set():
                    sys.stderr.write(line + "\n")
                else:
                    if held:
                        sys.stderr.write(held.pop() + "\n")
                    held.append(line)
                sys.stderr.flush()

    reader = threading.Thread(target=forward, name="hook output", daemon=True)
    reader.start()
    code = proc.wait()
    reader.join(timeout=1.0)  # what the hook wrote before it exited; not a job it left behind
    with lock:
        taken.set()
        return code, held[0] if held else ""


class ForeignRepositoryError(MintError):
    """A hook of a repository (or a hook file) owned by another user: running it would run their code as you."""


def _refuse_foreign(git_dir: Path, hook: Path) -> None:
    """Refuse to run hooks from a repository another user owns, as git's safe.directory check does."""
    if not hasattr(os, "getuid"):
        return
    me = os.getuid()
    for path in (git_dir, hook):
        owner = path.stat().st_uid
        if owner != me:
            raise ForeignRepositoryError(
                f"not running {hook}: {path} belongs to uid {owner}, not to you (uid {me}), so "
                "the hook would run someone else's code as you; chown the repository, or skip "
                "hooks with --no-verify"
            )


class NestedRepositoryError(MintError):
    """A hook of a repository that lies inside another repository's work tree: it may have come
    with that work tree's files, so running it would run their author's code as you."""


# The user's own setting, in the global or system git config (never the repository's own,
# which comes with the repository): repositories whose hooks run although they lie inside
# another repository's work tree. A path (the work tree, or the .mint or store directory), or *.
TRUST_KEY = (b"mint",), b"safeHooks"


def _refuse_nested(git_dir: Path, hook: Path) -> None:
    """Refuse to run hooks of a repository inside another repository's work tree, unless trusted.

    git refuses to check out a `.git` path, so a clone never holds a repository with hooks;
    it does check out `.mint`, and a mintvcs revision may carry the files of a bare store
    (HEAD, objects/, refs/, hooks/). Either then lies inside a git or mintvcs work tree, which
    a repository made by `mintvcs init` or a `git clone` of one normally does not.
    """
    git_dir = Path(os.path.abspath(git_dir))
    outer = _enclosing_work_tree(git_dir)
    if outer is None:
        return
    kind, where = outer
    own = git_dir.parent if git_dir.name == ".mint" else git_dir
    if _trusted(git_dir, own):
        return
    raise NestedRepositoryError(
        f"not running {hook}: this repository lies inside the work tree of the {kind} repository "
        f"at {where}, so its hooks may have come with that work tree's files (a project that "
        f"tracks a .mint, a revision that carries a store); if they are yours, trust them with "
        f"`git config --global --add mint.safeHooks {own}`"
        + (", or skip hooks with --no-verify" if hook.name in ("pre-commit", "commit-msg") else "")
    )


def _enclosing_work_tree(git_dir: Path) -> tuple[str, Path] | None:
    """("git" or "mintvcs", the folder) of the nearest repository whose work tree holds `git_dir`."""
    for folder in (git_dir, *git_dir.parents):
        if os.path.lexists(folder / ".git"):  # a directory, or a worktree's or submodule's file
            return "git", folder
        if folder / ".mint" != git_dir and os.path.lexists(folder / ".mint"):
            return "mintvcs", folder
    return None


def _trusted(*paths: Path) -> bool:
    """Whether the user's global or system git config lists one of `paths` in mint.safeHooks."""
    from dulwich.config import StackedConfig

    from mintvcs.gitconfig import BadConfigError, home_path, user_configs

    try:
        values = list(StackedConfig(user_configs()).get_multivar(*TRUST_KEY))
    except BadConfigError as err:  # an unreadable config trusts nothing
        sys.stderr.write(f"warning: cannot read your git config for mint.safeHooks: {err}\n")
        return False
    wanted = {os.path.realpath(path) for path in paths}
    for value in values:
        text = os.fsdecode(value).strip()
        path = home_path(text)  # `~` from $HOME alone, as git's safe.directory
        if text == "*" or (path is not None and os.path.realpath(path) in wanted):
            return True
    return False


def hooks_path_warning(git_dir: Path) -> str | None:
    """A warning when the user's global or system git config sets core.hooksPath: git then runs
    the hooks there, and `.mint/hooks/update`, which refuses a push into the checked-out branch,
    never runs. Its remedy is an absolute core.hooksPath in `.mint/config`, which wins over
    theirs: a relative `hooks` git would take from the directory it runs in, so `git --git-dir
    .mint ...` in the work tree would run the checked-out revision's `hooks/` files."""
    from mintvcs.gitconfig import BadConfigError, user_configs

    try:
        configs = user_configs(git_dir)
    except BadConfigError:
        return None  # said by the first command that reads it
    for config in configs:
        try:
            where = config.get((b"core",), b"hooksPath").decode(errors="replace")
        except KeyError:
            continue
        hooks = git_dir.resolve() / "hooks"
        return (
            f"warning: your git config sets core.hooksPath ({where}), so git runs no hook of "
            ".mint/hooks and a `git push` may move the branch checked out here; to keep the "
            f"guard, run: git --git-dir {shlex.quote(str(git_dir.resolve()))} config "
            f"core.hooksPath {shlex.quote(str(hooks))}"
        )
    return None


def is_sample(git_dir: Path, name: str) -> bool:
    """True when `.mint/hooks/NAME` is active and byte-identical to the shipped sample (or to
    an earlier version of it).

    mintvcs then runs the sample's checks in-process instead of starting a Python process
    (same checks, same refusal message); any edit to the hook makes it run as a program.
    """
    path = git_dir / "hooks" / name
    try:
        installed = path.read_bytes()
    except OSError:
        return False
    if not os.access(path, os.X_OK):
        return False
    return _sample_bytes(name) == installed or blob_id(installed) in _EARLIER_SAMPLES.get(name, ())


def _instead_of_earlier_sample(path: Path, name: str) -> bytes | None:
    """The current sample `name` when the hook at `path` is an unmodified earlier one, else None."""
    earlier = _EARLIER_SAMPLES.get(name)
    if not earlier:
        return None
    try:
        installed = path.read_bytes()
    except OSError:
        return None
    return _sample_bytes(name) if blob_id(installed) in earlier else None


def _sample_bytes(name: str) -> bytes | None:
    """The shipped sample hook `name`, or None when there is no such sample.

    Read straight from the package directory where there is one: importlib.resources costs
    ~14 ms to import and set up, a tenth of a commit's start-up.
    """
    import importlib.util

    spec = importlib.util.find_spec("mintvcs.hook_samples")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / name
        if path.is_file():
            return path.read_bytes()
    from importlib import resources  # e.g. a zipped install

    sample = resources.files("mintvcs.hook_samples") / name
    return sample.read_bytes() if sample.is_file() else None


def refusal(name: str, detail: str) -> HookRefusedError:
    """The error for hook `name` refusing a commit, its last output line being `detail`."""
    return HookRefusedError(
        f"{name} hook refused the commit: {detail} (use --no-verify to skip hooks)"
    )


def install_samples(git_dir: Path, shared: SharedPerm | None = None) -> None:
    """Copy the sample hooks into `.mint/hooks/`: pre-commit and update active, the rest as
    .sample; executable, as git installs its own: 0777 less the umask, then as
    core.sharedRepository (`shared`) says."""
    import shutil
    from importlib import resources

    target = git_dir / "hooks"
    make_dir(target, shared)
    samples = resources.files("mintvcs.hook_samples")
    for name in SAMPLES:
        source = samples / name
        if not source.is_file():
            continue
        dest = target / (name if name in INSTALLED_BY_INIT else f"{name}.sample")
        with resources.as_file(source) as src:
            try:
                shutil.copyfile(src, dest)
            except OSError as err:
                # copyfile names the source where the write fails (its sendfile path): the
                # file that could not be written is the destination.
                if err.errno is None:
                    raise
                raise OSError(err.errno, err.strerror, os.fspath(dest)) from None
        dest.chmod(file_mode(0o777, shared))
