"""Shared helpers for the store, CLI, bad-input and crash tests: run the CLI and git, build adapters by hand."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mintvcs.safetensors_file import parse_layout

# Fixed identities so that commits, reflogs and git's own checks never depend on the machine's config.
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "Tester",
    "GIT_AUTHOR_EMAIL": "tester@example.com",
    "GIT_COMMITTER_NAME": "Tester",
    "GIT_COMMITTER_EMAIL": "tester@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "NO_COLOR": "1",
}
ROOT = Path(__file__).resolve().parents[2]
ENV["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def mint(
    cwd: Path,
    *args: str,
    ok: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `mintvcs ARGS` as a real process in `cwd` (ENV, with `env` over it; `preexec_fn` run
    in the child first, a resource limit say), ending within `timeout` seconds (a command that
    blocks fails the test instead of hanging it); never a traceback, and exit 0 unless ok=False."""
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", *args],
        cwd=cwd,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        errors="surrogateescape",  # as git, names that are not UTF-8 print as their bytes
        check=False,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )
    assert "Traceback" not in result.stderr, f"mintvcs {args} raised:\n{result.stderr}"
    if ok:
        assert result.returncode == 0, (
            f"mintvcs {args} exited {result.returncode}:\n{result.stderr}"
        )
    return result


@functools.cache
def console_script() -> str:
    """The installed `mintvcs` console script, checked to run this checkout's code under ENV (its
    interpreter imports mintvcs from ROOT, PYTHONPATH's first entry); skips where none is installed."""
    import pytest

    script = Path(sys.executable).parent / "mintvcs"
    if not script.is_file():
        pytest.skip("no mintvcs console script beside this Python (pip install -e .)")
    interpreter = shlex.split(script.read_text().splitlines()[0].removeprefix("#!"))
    found = subprocess.run(
        [*interpreter, "-c", "import mintvcs; print(mintvcs.__file__)"],
        cwd=script.parent,  # first on sys.path, as the script's own directory is for the script
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout == f"{ROOT / 'mintvcs' / '__init__.py'}\n", found.stdout
    return str(script)


def run_on_terminal(
    program: str, argv: list[str], env: dict[str, str], cwd: Path | None = None, columns: int = 100
) -> bytes:
    """What `program` (run as `argv`, in `cwd`) writes to a pseudo-terminal of 24 x `columns`
    that is its stdout and stderr, until it exits or a minute has passed."""
    import fcntl
    import pty
    import select
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.execve(program, argv, env)
        finally:
            os._exit(127)  # never back into pytest
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child exited and closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    return out


def without_root_reads(command: list[str]) -> list[str]:
    """`command` so that a file's mode stops its reads: as it is for another user than root, and
    for root through setpriv, which drops the capabilities that let root read anything (the
    test is skipped where there is no setpriv)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        import pytest

        pytest.skip("root reads any file; dropping that needs setpriv")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", "--", *command]


def mint_unprivileged(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mint(cwd, *args, ok=False)` run so that files of mode 000 cannot be read (without_root_reads)."""
    return subprocess.run(
        without_root_reads([sys.executable, "-m", "mintvcs.cli", *args]),
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def mint_fails(cwd: Path, *args: str) -> str:
    """Run `mintvcs ARGS` expecting a refusal: non-zero exit and one `error:` line; returns that line."""
    result = mint(cwd, *args, ok=False)
    assert result.returncode != 0, f"mintvcs {args} should have failed:\n{result.stdout}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one error line, got:\n{result.stderr}"
    return errors[0]


def git(
    git_dir: Path, *args: str, ok: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run real git on a `.mint` directory (`input_text` on its stdin)."""
    result = subprocess.run(
        ["git", "--git-dir", str(git_dir), *args],
        env=ENV,
        input=input_text,
        capture_output=True,
        text=True,
        check=False,
    )
    if ok:
        assert result.returncode == 0, f"git {args} exited {result.returncode}:\n{result.stderr}"
    return result


def git_fsck(work: Path) -> None:
    """Real git's strictest check of a repository we wrote."""
    result = git(work / ".mint", "fsck", "--strict", "--no-dangling", ok=False)
    assert result.returncode == 0, f"git fsck --strict failed:\n{result.stdout}\n{result.stderr}"
    assert "error" not in result.stderr.lower(), result.stderr


def git_log(work: Path, ref: str = "HEAD") -> list[str]:
    """Commit ids that real git lists from `ref`, newest first."""
    return git(work / ".mint", "log", "--format=%H", ref).stdout.split()


def copy_adapter(src: Path, dst: Path) -> Path:
    """Copy a PEFT adapter directory's files (not any .mint) into `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file():
            shutil.copyfile(path, dst / path.name)
    return dst


def tensor_names(adapter: Path) -> list[str]:
    """Tensor names of an adapter's safetensors file, in file order."""
    layout = parse_layout((adapter / WEIGHTS).read_bytes(), "test")
    return [t.name for t in layout.tensors]


def mutate(
    adapter: Path, *, seed: int, names: list[str] | None = None, scale: float = 1e-3
) -> None:
    """Change the values of some tensors in place, keeping the header byte-for-byte."""
    path = adapter / WEIGHTS
    data = bytearray(path.read_bytes())
    layout = parse_layout(bytes(data), str(path))
    rng = np.random.default_rng(seed)
    offset = len(layout.header)
    for entry in layout.tensors:
        if names is not None and entry.name not in names:
            continue
        view = data[offset + entry.start : offset + entry.end]
        if entry.dtype == "F32":
            values = np.frombuffer(bytes(view), "<f4")
            new = (
                (values + rng.standard_normal(values.size).astype("<f4") * scale)
                .astype("<f4")
                .tobytes()
            )
        elif entry.dtype == "BF16":
            # Nudge the low mantissa bits: a small, finite change of a bf16 value.
            bits = np.frombuffer(bytes(view), "<u2")
            new = (bits ^ rng.integers(1, 4, bits.size, dtype="<u2")).astype("<u2").tobytes()
        else:
            raise AssertionError(f"mutate: dtype {entry.dtype} not handled")
        data[offset + entry.start : offset + entry.end] = new
    # Atomic, so that a test process killed here leaves the old file, not half of it.
    tmp = path.with_name(path.name + ".mutating")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


def set_value(adapter: Path, name: str, index: int, value: float) -> None:
    """Set one element of tensor `name` (F32 or BF16) to `value`, keeping the header."""
    path = adapter / WEIGHTS
    data = bytearray(path.read_bytes())
    layout = parse_layout(bytes(data), str(path))
    entry = next(t for t in layout.tensors if t.name == name)
    start = len(layout.header) + entry.start
    if entry.dtype == "F32":
        data[start + 4 * index : start + 4 * index + 4] = struct.pack("<f", value)
    elif entry.dtype == "BF16":
        data[start + 2 * index : start + 2 * index + 2] = struct.pack("<f", value)[2:]
    else:
        raise AssertionError(f"set_value: dtype {entry.dtype} not handled")
    path.write_bytes(bytes(data))


def write_safetensors(
    path: Path,
    tensors: dict[str, tuple[str, list[int], bytes]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file by hand (8-byte length, JSON header, data), so any name can be written."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(
        struct.pack("<Q", len(encoded)) + encoded + b"".join(raw for _, _, raw in tensors.values())
    )


def lora_config(
    targets: list[str], r: int = 4, rank_pattern: dict[str, int] | None = None
) -> bytes:
    """A minimal PEFT LoRA adapter_config.json."""
    config: dict[str, object] = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
    }
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    return json.dumps(config).encode()


def config_for(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """A LoRA config that fits hand-made tensors: every module they adapt targeted, at its rank."""
    ranks: dict[str, int] = {}
    for name, (_dtype, shape, _raw) in tensors.items():
        module, sep, kind = name.rpartition(".lora_")
        if sep and kind in ("A.weight", "B.weight") and len(shape) == 2:
            ranks[module] = shape[0] if kind == "A.weight" else shape[1]
    if not ranks:
        return lora_config(["q_proj"])
    common = max(set(ranks.values()), key=list(ranks.values()).count)
    targets = sorted({module.rsplit(".", 1)[-1] for module in ranks})
    odd = {re.escape(m): r for m, r in ranks.items() if r != common}
    return lora_config(targets, common, odd)


def handmade_adapter(
    directory: Path,
    tensors: dict[str, tuple[str, list[int], bytes]],
    targets: list[str] | None = None,
) -> Path:
    """A PEFT-shaped adapter directory written without PEFT (config + hand-written safetensors).

    Without `targets`, the config is made to fit the tensors (`config_for`), as PEFT would save it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = lora_config(targets) if targets else config_for(tensors)
    (directory / CONFIG).write_bytes(config)
    write_safetensors(directory / WEIGHTS, tensors, {"format": "pt"})
    return directory


def random_f32(rng: np.random.Generator, shape: list[int], scale: float = 0.02) -> bytes:
    """Random fp32 tensor bytes."""
    return (rng.standard_normal(shape).astype("<f4") * np.float32(scale)).tobytes()


def snapshot(work: Path) -> dict[str, object]:
    """Everything a refused operation must leave alone: HEAD, every ref, the work tree's bytes."""
    git_dir = work / ".mint"
    refs: dict[str, str] = {}
    for line in git(
        git_dir, "for-each-ref", "--format=%(refname) %(objectname)"
    ).stdout.splitlines():
        name, oid = line.split()
        refs[name] = oid
    files = {
        p.relative_to(work).as_posix(): p.read_bytes()
        for p in sorted(work.rglob("*"))
        if p.is_file() and ".mint" not in p.relative_to(work).parts
    }
    return {"HEAD": (git_dir / "HEAD").read_text(), "refs": refs, "files": files}


def assert_intact(work: Path, before: dict[str, object]) -> None:
    """Nothing lost: refs, HEAD and work tree as before, and both fscks pass."""
    after = snapshot(work)
    assert after["HEAD"] == before["HEAD"]
    assert after["refs"] == before["refs"]
    assert after["files"] == before["files"]
    mint_fsck_ok(work)
    git_fsck(work)


def mint_fsck_ok(work: Path) -> None:
    """`mintvcs fsck` through the API (in-process, so that many checks stay fast)."""
    from mintvcs.maintenance import fsck
    from mintvcs.store import Repository

    repo = Repository.open(work)
    try:
        report = fsck(repo)
    finally:
        repo.close()
    assert report.ok, report.problems


def blobs(work: Path, rev: str = "HEAD") -> list[str]:
    """Blob ids of `rev`'s tree, largest first (real git lists them)."""
    out = git(work / ".mint", "ls-tree", "-r", "-l", rev).stdout
    rows = [line.split() for line in out.splitlines()]
    return [row[2] for row in sorted(rows, key=lambda r: -int(r[3])) if row[1] == "blob"]


def loose_path(work: Path, oid: str) -> Path:
    """Where loose object `oid` lives."""
    return work / ".mint" / "objects" / oid[:2] / oid[2:]


def damage_checks(work: Path) -> tuple[list[str], tuple[int, str]]:
    """What `mintvcs fsck --json` and `git fsck --strict` report."""
    report = json.loads(mint(work, "fsck", "--json", ok=False).stdout)
    strict = git(work / ".mint", "fsck", "--strict", "--no-dangling", ok=False)
    return sorted(report["problems"]), (strict.returncode, strict.stdout + strict.stderr)


def commit_with_manifest_files(
    work: Path,
    extra: list[dict[str, object]],
    edit_tensors: Any = None,
    *,
    edit_header: Any = None,
    edit_manifest: Any = None,
    message: bytes = b"hostile\n",
    when: int = 0,
    in_tree: bool = False,
) -> str:
    """A commit like HEAD whose manifest also lists `extra` files (as a hostile repository could).

    `edit_tensors`, if given, changes the manifest's tensor records (a list of dicts) in place,
    and the safetensors header is rewritten to match them; `edit_header`, if given, then changes
    that header's JSON (a dict) in place. `edit_manifest`, if given, last changes the whole
    manifest (a dict) in place. `in_tree`: the tree's `files/` holds the files too, as a careful
    hostile writer keeps it.
    """
    from dulwich.objects import Tree

    from mintvcs.store import Repository

    repo = Repository.open(work)
    head = repo.head_commit()
    assert head is not None
    tree = repo.get_object(repo.commit_info(head).tree)
    assert isinstance(tree, Tree)
    manifest = json.loads(repo.read_blob(tree[b"manifest.json"][1].decode()))
    manifest["files"] = manifest.get("files", []) + extra
    entries = {}
    if edit_tensors is not None:
        edit_tensors(manifest["tensors"])
        # The tree names the blobs the manifest does, as a careful hostile writer keeps it:
        # what is then caught is the record's own dtype, shape and sha256.
        tensors = Tree()
        for record in manifest["tensors"]:
            tensors[record["name"].encode()] = (0o100644, record["blob"].encode())
        repo.add_object(tensors)
        entries["tensors"] = tensors.id.decode()
    if edit_tensors is not None or edit_header is not None:
        raw = repo.read_blob(manifest["safetensors"]["header"])
        (length,) = struct.unpack("<Q", raw[:8])
        metadata = json.loads(raw[8 : 8 + length]).get("__metadata__")
        header: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
        for record in manifest["tensors"]:  # as a careful hostile writer keeps them in step
            header[record["name"]] = {
                "dtype": record["dtype"],
                "shape": record["shape"],
                "data_offsets": [record["start"], record["end"]],
            }
        if edit_header is not None:
            edit_header(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        entries["safetensors-header"] = repo.add_blob(struct.pack("<Q", len(text)) + text)
        manifest["safetensors"]["header"] = entries["safetensors-header"]
    if in_tree:
        nested: dict[str, Any] = {}
        for record in manifest["files"]:
            *dirs, name = record["path"].split("/")
            folder = nested
            for part in dirs:
                folder = folder.setdefault(part, {})
            folder[name] = (0o100755 if record["executable"] else 0o100644, record["blob"])

        def write(folder: dict[str, Any]) -> str:
            subtree = Tree()
            for name, entry in folder.items():
                if isinstance(entry, dict):
                    entry = (0o040000, write(entry))
                subtree[name.encode()] = (entry[0], entry[1].encode())
            repo.add_object(subtree)
            return subtree.id.decode()

        entries["files"] = write(nested)
    if edit_manifest is not None:
        edit_manifest(manifest)
    entries["manifest.json"] = repo.add_blob(json.dumps(manifest).encode())
    return hostile_commit(work, entries, message=message, when=when)


def hostile_commit(
    work: Path, entries: dict[str, str], *, message: bytes = b"hostile\n", when: int = 0
) -> str:
    """A commit on HEAD, as a hostile repository could hold, whose tree is HEAD's with `entries`
    (top-level name -> blob id) put in; branch `hostile` points at it."""
    from dulwich.objects import Commit, Tree

    from mintvcs.store import Repository

    repo = Repository.open(work)
    head = repo.head_commit()
    assert head is not None
    tree = repo.get_object(repo.commit_info(head).tree)
    assert isinstance(tree, Tree)
    for name, oid in entries.items():
        mode = 0o040000 if isinstance(repo.get_object(oid), Tree) else 0o100644
        tree[name.encode()] = (mode, oid.encode())
    repo.add_object(tree)
    commit = Commit()
    commit.tree, commit.parents = tree.id, [head.encode()]
    commit.author = commit.committer = b"Eve <eve@example.com>"
    commit.author_time = commit.commit_time = when
    commit.author_timezone = commit.commit_timezone = 0
    commit.message = message
    repo.add_object(commit)
    oid = commit.id.decode()
    old = repo.refs.read("refs/heads/hostile")
    repo.refs.update("refs/heads/hostile", oid, old=old, message="test", identity="T <t@t>")
    return oid


def edit_blob_header(blob: bytes, edit: Any = None, *, version: int | None = None) -> bytes:
    """A tensor blob with its header's JSON (a dict) changed by `edit` in place, and its version
    byte set to `version` if given; the header's CRC-32 is made right again, as a writer's is."""
    magic, old_version, length = struct.unpack_from("<8sBI", blob, 0)
    header = json.loads(blob[13 : 13 + length])
    if edit is not None:
        edit(header)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    prefix = struct.pack("<8sBI", magic, old_version if version is None else version, len(text))
    prefix += text
    return prefix + struct.pack("<I", zlib.crc32(prefix)) + blob[13 + length + 4 :]


def swap_two_offsets(header: dict[str, Any]) -> None:
    """Trade the data_offsets of two tensors of one dtype and shape in a header's JSON."""
    first: dict[tuple[str, tuple[int, ...]], dict[str, Any]] = {}
    for name, entry in header.items():
        if name != "__metadata__":
            other = first.setdefault((entry["dtype"], tuple(entry["shape"])), entry)
            if other is not entry:
                other["data_offsets"], entry["data_offsets"] = (
                    entry["data_offsets"],
                    other["data_offsets"],
                )
                return
    raise AssertionError("no two tensors of one dtype and shape")


def count_reads(repo: Any, monkeypatch: Any) -> list[str]:
    """The ids `repo` reads from now on, in order (the list fills as it reads): objects read
    through get_object, commits through the walks' reader (_commit_body; a commit that reader
    leaves to get_object counts twice)."""
    reads: list[str] = []
    for name in ("get_object", "_commit_body"):
        reader = getattr(repo, name)

        def counting(oid: str, *args: Any, _reader: Any = reader, **kwargs: Any) -> Any:
            reads.append(oid)
            return _reader(oid, *args, **kwargs)

        monkeypatch.setattr(repo, name, counting)
    return reads


def whole_commit_reads(repo: Any, monkeypatch: Any) -> list[str]:
    """The commits `repo` parses whole (through dulwich) from now on, in order: those the
    walks' own reader (commits.parse_plain) leaves to it."""
    reads: list[str] = []
    read_whole = repo._read_whole_commit

    def counting(oid: str) -> Any:
        reads.append(oid)
        return read_whole(oid)

    monkeypatch.setattr(repo, "_read_whole_commit", counting)
    return reads


def deleted_packs_held(git_dir: Path) -> list[str]:
    """This process's descriptors and memory maps of `git_dir`'s packs that were deleted since."""
    packs = str(git_dir / "objects" / "pack")
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
    with open("/proc/self/maps") as maps:
        held += maps.read().splitlines()
    return [line for line in held if packs in line and "(deleted)" in line]


def pack_objects(git_dir: Path, ids: Sequence[str]) -> None:
    """Put objects `ids` of `git_dir` into one new pack (git pack-objects); their loose copies
    stay until `git prune-packed`."""
    pack = str(git_dir / "objects/pack/pack")
    git(git_dir, "pack-objects", "-q", pack, input_text="".join(oid + "\n" for oid in ids))


def pack_each_object(git_dir: Path) -> int:
    """Put every object of `git_dir` in a pack of its own (git pack-objects), none left loose:
    the many packs a store piles up while gc --auto does not run. Returns how many."""
    ids = [oid for oid in git(git_dir, "rev-list", "--objects", "--all").stdout.split()]
    ids = [oid for oid in ids if len(oid) == 40]
    for oid in ids:
        pack_objects(git_dir, [oid])
    git(git_dir, "prune-packed")
    assert not list(git_dir.glob("objects/??/*"))
    assert len(list(git_dir.glob("objects/pack/*.pack"))) == len(ids)
    return len(ids)


def _commit_head(git_dir: Path, parent: str) -> str:
    """A commit's lines before its message: `parent`'s tree, `parent`, a fixed identity and date."""
    tree = git(git_dir, "rev-parse", f"{parent}^{{tree}}").stdout.strip()
    return (
        f"tree {tree}\nparent {parent}\n"
        "author Tester <tester@example.com> 1767225700 +0000\n"
        "committer Tester <tester@example.com> 1767225700 +0000\n\n"
    )


def _write_commit(git_dir: Path, body: bytes) -> str:
    result = subprocess.run(
        ["git", "--git-dir", str(git_dir), "hash-object", "-t", "commit", "-w", "--stdin"],
        input=body,
        env=ENV,
        capture_output=True,
        check=True,
    )
    return result.stdout.decode().strip()


def _commit_id(body: bytes) -> str:
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


def colliding_commits(git_dir: Path, parent: str, digits: int) -> tuple[str, str]:
    """Write two commits on `parent` whose ids share exactly their first `digits` hex digits
    (a birthday search over their messages: ~16^(digits/2) tries, under a second for 7)."""
    head, seen = _commit_head(git_dir, parent), dict[str, bytes]()
    for i in itertools.count():
        body = f"{head}collide {i}\n".encode()
        commit_id = _commit_id(body)
        prefix = commit_id[:digits]
        # A pair sharing one digit more (1 in 16) would be printed a digit longer.
        if prefix in seen and _commit_id(seen[prefix])[digits] != commit_id[digits]:
            return _write_commit(git_dir, seen[prefix]), _write_commit(git_dir, body)
        seen.setdefault(prefix, body)
    raise AssertionError("unreachable")


def commit_starting_with(git_dir: Path, parent: str, prefix: str) -> str:
    """Write a commit on `parent` whose id starts with `prefix` (~16^len(prefix) tries)."""
    head = _commit_head(git_dir, parent)
    for i in itertools.count():
        body = f"{head}twin {i}\n".encode()
        if _commit_id(body).startswith(prefix):
            return _write_commit(git_dir, body)
    raise AssertionError("unreachable")
