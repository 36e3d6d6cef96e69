"""Bad input: each is refused with one clear line and a non-zero exit, and nothing is lost."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mintvcs import porcelain
from mintvcs.errors import MintError
from mintvcs.maintenance import fsck
from mintvcs.store import Repository
from tests.fixtures import make_peft_adapter
from tests.mintvcs.storekit import (
    CONFIG,
    ENV,
    WEIGHTS,
    assert_intact,
    commit_with_manifest_files,
    copy_adapter,
    git,
    git_fsck,
    handmade_adapter,
    hostile_commit,
    loose_path,
    mint,
    mint_fails,
    mutate,
    random_f32,
    set_value,
    snapshot,
    swap_two_offsets,
    tensor_names,
    write_safetensors,
)

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory: pytest.TempPathFactory, other_base: Path) -> Path:
    """A PEFT adapter made for other_base (hidden size 96), not for tiny_base."""
    return make_peft_adapter(other_base, tmp_path_factory.mktemp("adapters") / "for-other")


@pytest.fixture
def work(tmp_path: Path, tiny_base: Path, peft_adapter: Path) -> Path:
    """A repository of tiny_base with two commits, a branch and a tag; the work tree at HEAD."""
    work = tmp_path / "work"
    repo = porcelain.init(work, str(tiny_base))
    copy_adapter(peft_adapter, work)
    porcelain.commit(repo, "first", verify=False, show_progress=False)
    mutate(work, seed=1)
    porcelain.commit(repo, "second", verify=False, show_progress=False)
    porcelain.branch_create(repo, "dev", "HEAD~1")
    porcelain.tag_create(repo, "v1", "HEAD", message="one")
    repo.close()
    return work


def refused(work: Path, *args: str) -> str:
    """Run a verb that must be refused; check nothing was lost; return the error line."""
    before = snapshot(work)
    line = mint_fails(work, *args)
    assert_intact(work, before)
    return line


# ------------------------------------------------------ not a PEFT adapter
def _no_config(d: Path, src: Path) -> None:
    (d / WEIGHTS).write_bytes((src / WEIGHTS).read_bytes())


def _no_weights(d: Path, src: Path) -> None:
    (d / CONFIG).write_bytes((src / CONFIG).read_bytes())


def _bin_only(d: Path, src: Path) -> None:
    (d / CONFIG).write_bytes((src / CONFIG).read_bytes())
    (d / "adapter_model.bin").write_bytes(b"PK\x03\x04 pickled torch state")


def _bad_config_json(d: Path, src: Path) -> None:
    (d / CONFIG).write_text("{not json")
    (d / WEIGHTS).write_bytes((src / WEIGHTS).read_bytes())


def _not_lora(d: Path, src: Path) -> None:
    config = json.loads((src / CONFIG).read_bytes())
    config["peft_type"] = "IA3"
    (d / CONFIG).write_text(json.dumps(config))
    (d / WEIGHTS).write_bytes((src / WEIGHTS).read_bytes())


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda d, s: None, f"{CONFIG} is missing"),
        (_no_config, f"{CONFIG} is missing"),
        (_no_weights, f"{WEIGHTS} is missing"),
        (_bin_only, "adapter_model.bin"),
        (_bad_config_json, "invalid JSON"),
        (_not_lora, "IA3"),
    ],
    ids=["empty", "no-config", "no-safetensors", "bin-only", "config-not-json", "not-lora"],
)
def test_not_a_peft_adapter(
    work: Path, tmp_path: Path, peft_adapter: Path, make, expected: str
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    make(bad, peft_adapter)
    line = refused(work, "commit", "-m", "bad", "--from", str(bad))
    assert "not a PEFT adapter" in line or "not supported" in line or "invalid JSON" in line
    assert expected in line and str(bad) in line


def test_work_tree_that_is_not_an_adapter(work: Path) -> None:
    (work / WEIGHTS).unlink()
    line = refused(work, "commit", "-m", "bad")
    assert f"{WEIGHTS} is missing" in line
    # status says so rather than failing.
    out = json.loads(mint(work, "status", "--json").stdout)
    assert out["clean"] is False


# ------------------------------------------------- broken safetensors files
def _truncate(data: bytes) -> bytes:
    return data[: len(data) - 1000]


def _trailing_bytes(data: bytes) -> bytes:
    return data + b"\0" * 16


def _truncate_in_header(data: bytes) -> bytes:
    return data[:20]


def _tiny(data: bytes) -> bytes:
    return data[:5]


def _garbage_header(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    return data[:8] + b"\xff" * n + data[8 + n :]


def _huge_header_length(data: bytes) -> bytes:
    return struct.pack("<Q", 2**62) + data[8:]


def _wrong_offsets(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    raw = json.dumps(header).encode()
    raw += b" " * (n - len(raw)) if len(raw) <= n else b""
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def _bad_dtype(data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].replace(b'"F32"', b'"Q32"', 1)
    return data[:8] + text + data[8 + n :]


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (_truncate, "truncated"),
        (_trailing_bytes, "trailing bytes after the last tensor"),
        (_truncate_in_header, "does not fit"),
        (_tiny, "truncated"),
        (_garbage_header, "not valid JSON"),
        (_huge_header_length, "does not fit"),
        (_wrong_offsets, WEIGHTS),
        (_bad_dtype, "which mintvcs does not store"),
    ],
    ids=[
        "truncated-data",
        "trailing-bytes",
        "truncated-header",
        "five-bytes",
        "garbage-header",
        "huge-length",
        "offsets",
        "dtype",
    ],
)
def test_truncated_or_corrupt_safetensors(
    work: Path, tmp_path: Path, peft_adapter: Path, corrupt, expected: str
) -> None:
    bad = copy_adapter(peft_adapter, tmp_path / "bad")
    (bad / WEIGHTS).write_bytes(corrupt((peft_adapter / WEIGHTS).read_bytes()))
    line = refused(work, "commit", "-m", "bad", "--from", str(bad))
    assert expected in line and str(bad / WEIGHTS) in line


# ----------------------------------------------------------- tensor names
BAD_NAMES = [
    "base_model.model.model.layers.0/self_attn.q_proj.lora_A.weight",
    "../../etc/passwd",
    "..",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\x00evil",
    "",
    # git fsck's hasDotgit (and any fsck-checking clone or push) refuses these tree entries.
    ".GIT",
    "git~1",
    ".git. .",
    ".g\u200cit",
    ".gitmodules",
    "GITMOD~4",  # an NTFS short name of .gitmodules
]


@pytest.mark.parametrize(
    "name",
    BAD_NAMES,
    ids=[
        *("slash", "dotdot-path", "dotdot", "nul", "empty"),
        *("dotgit-case", "dotgit-ntfs-short", "dotgit-ntfs-dots", "dotgit-hfs", "gitmodules"),
        "gitmodules-ntfs-short",
    ],
)
def test_bad_tensor_names(work: Path, tmp_path: Path, name: str) -> None:
    rng = np.random.default_rng(0)
    bad = handmade_adapter(
        tmp_path / "bad",
        {
            name: ("F32", [8, 64], random_f32(rng, [8, 64])),
            Q_A.replace("lora_A", "lora_B"): ("F32", [64, 8], random_f32(rng, [64, 8])),
        },
    )
    line = refused(work, "commit", "-m", "bad", "--from", str(bad), "--no-verify")
    assert "tensor name" in line and repr(name) in line


# ---------------------------------------------------------- NaN, Inf, base
@pytest.mark.parametrize(
    ("value", "index"), [(float("nan"), 3), (float("inf"), 0), (float("-inf"), 17)]
)
def test_non_finite_adapter_refused_by_hook(
    work: Path, tmp_path: Path, value: float, index: int
) -> None:
    bad = copy_adapter(work, tmp_path / "bad")
    name = tensor_names(bad)[5]
    set_value(bad, name, index, value)
    line = refused(work, "commit", "-m", "bad", "--from", str(bad))
    assert "pre-commit" in line and name in line and "non-finite" in line
    # --no-verify skips the hook: the user asked for it.
    out = json.loads(
        mint(work, "commit", "-m", "forced", "--from", str(bad), "--no-verify", "--json").stdout
    )
    assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == out["commit"]


def test_non_finite_values_a_parent_kept_are_refused_by_a_verified_commit(work: Path) -> None:
    # The parent was committed with --no-verify; the next verified commit leaves that tensor
    # unchanged (its blob is reused, not encoded again), yet the NaN is still refused by name.
    names = tensor_names(work)
    set_value(work, names[5], 3, float("nan"))
    mint(work, "commit", "-m", "forced", "--no-verify")
    mutate(work, seed=4, names=[names[0]])
    line = refused(work, "commit", "-m", "verified")
    assert names[5] in line and "non-finite" in line and names[0] not in line


def test_of_several_non_finite_tensors_the_first_in_file_order_is_named(work: Path) -> None:
    # Tensors are encoded on several threads; the refusal still names the first in file order.
    names = tensor_names(work)
    for name in (names[2], names[-1]):
        set_value(work, name, 0, float("nan"))
    line = refused(work, "commit", "-m", "bad")
    assert names[2] in line and names[-1] not in line and "non-finite" in line


def test_non_finite_bf16_refused(tmp_path: Path, tiny_base: Path, peft_adapter_bf16: Path) -> None:
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work), "--base-model", str(tiny_base))
    copy_adapter(peft_adapter_bf16, work)
    name = tensor_names(work)[-1]
    set_value(work, name, 2, float("nan"))
    line = mint_fails(work, "commit", "-m", "bad")
    assert name in line and "non-finite" in line
    assert git(work / ".mint", "rev-parse", "-q", "--verify", "HEAD", ok=False).returncode != 0


def test_adapter_for_another_base_refused(work: Path, other_adapter: Path) -> None:
    line = refused(work, "commit", "-m", "wrong base", "--from", str(other_adapter))
    assert "another base model" in line and ".lora_" in line
    # The shape check is in the store itself: --no-verify does not bypass it.
    line = refused(work, "commit", "-m", "wrong base", "--from", str(other_adapter), "--no-verify")
    name = line.split("tensor ")[1].split()[0]
    assert name in tensor_names(other_adapter)


def test_adapter_targeting_missing_module_refused(work: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    name = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
    bad = handmade_adapter(tmp_path / "bad", {name: ("F32", [4, 64], random_f32(rng, [4, 64]))})
    line = refused(work, "commit", "-m", "bad", "--from", str(bad), "--no-verify")
    assert name in line and "does not have" in line


def test_init_with_bad_base_model(tmp_path: Path) -> None:
    (tmp_path / "notamodel").mkdir()
    line = mint_fails(tmp_path, "init", "repo", "--base-model", str(tmp_path / "notamodel"))
    assert "config.json is missing" in line
    assert not (tmp_path / "repo" / ".mint").exists(), (
        "a refused init must not leave a half-made repository"
    )


# ------------------------------------------------------------ unknown refs
@pytest.mark.parametrize(
    "args",
    [
        ("checkout", "nope"),
        ("checkout", "main~9"),
        ("log", "nope"),
        ("show", "nope"),
        ("diff", "nope", "HEAD"),
        ("diff", "HEAD", "nope"),
        ("reset", "nope"),
        ("reset", "--hard", "deadbeef"),
        ("branch", "new", "nope"),
        ("tag", "-d", "nope"),
        ("checkout", "0000000"),
    ],
    ids=lambda a: "-".join(a),
)
def test_unknown_refs(work: Path, args: tuple[str, ...]) -> None:
    bad = next(a for a in args if a in ("nope", "main~9", "deadbeef", "0000000"))
    line = refused(work, *args)
    assert bad in line


def test_outside_a_repository(tmp_path: Path) -> None:
    line = mint_fails(tmp_path, "log")
    assert "not a mintvcs repository" in line and "mintvcs init" in line


# -------------------------------------------------- names git would refuse
BAD_REF_NAMES = ["a..b", "x~1", "has space", "-lead", "x^2", "a:b", "br[", "x.lock", "@{x"]


@pytest.mark.parametrize("name", BAD_REF_NAMES)
def test_branch_names_git_refuses(work: Path, name: str) -> None:
    assert git(work / ".mint", "check-ref-format", "--branch", name, ok=False).returncode != 0
    line = refused(work, "branch", "--", name)
    assert "invalid ref name" in line and repr(name)[1:-1] in line
    line = refused(work, "checkout", "-b", name, "HEAD")
    assert "invalid ref name" in line and repr(name)[1:-1] in line


@pytest.mark.parametrize(
    "name",
    BAD_REF_NAMES,
)
def test_tag_names_git_refuses(work: Path, name: str) -> None:
    # git's own `git tag` refuses these names (a leading '-' included).
    line = refused(work, "tag", "--", name)
    assert "invalid ref name" in line and repr(name)[1:-1] in line


# -------------------------------------------------------- flipped bytes
def _blob_of(work: Path, rev: str, kind: str) -> tuple[str, str]:
    """(object id, tensor name or '') of one object of revision `rev`."""
    repo = Repository.open(work)
    try:
        revision = repo.read_revision(repo.resolve(rev))
        if kind == "tensor":
            record = revision.manifest.tensors[3]
            return record.blob, record.name
        if kind == "commit":
            return revision.commit, ""
        if kind == "tree":
            return revision.info.tree, ""
        if kind == "manifest":
            return revision._tree["manifest.json"], ""
        if kind == "config":
            return revision._tree[CONFIG], ""
        raise AssertionError(kind)
    finally:
        repo.close()


def _flip_loose(work: Path, oid: str) -> None:
    path = work / ".mint" / "objects" / oid[:2] / oid[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


def _flip_packed(work: Path, oid: str) -> None:
    # Real git's `show-index` gives each packed object's offset.
    packs = sorted((work / ".mint" / "objects" / "pack").glob("*.idx"))
    for idx in packs:
        listing = subprocess.run(
            ["git", "show-index"], input=idx.read_bytes(), capture_output=True, check=True
        ).stdout.decode()
        offsets = {line.split()[1]: int(line.split()[0]) for line in listing.splitlines()}
        if oid in offsets:
            break
    else:
        raise AssertionError(f"{oid} is in no pack")
    path = idx.with_suffix(".pack")
    data = bytearray(path.read_bytes())
    data[offsets[oid] + 64] ^= 0x10
    os.chmod(path, 0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["loose", "packed"])
@pytest.mark.parametrize("kind", ["tensor", "manifest", "tree", "commit", "config"])
def test_flipped_byte_in_object(work: Path, where: str, kind: str) -> None:
    if where == "packed":
        mint(work, "gc")
        loose = [
            p
            for p in (work / ".mint" / "objects").iterdir()
            if len(p.name) == 2 and any(p.iterdir())
        ]
        assert loose == []
    # Corrupt an object of the first revision (dev); HEAD (main) is the second.
    oid, tensor = _blob_of(work, "dev", kind)
    assert kind not in ("manifest", "tree", "commit") or _blob_of(work, "main", kind)[0] != oid
    (_flip_loose if where == "loose" else _flip_packed)(work, oid)
    before = snapshot(work)
    # fsck names the object and exits 1.
    result = mint(work, "fsck", ok=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert oid in result.stderr
    if tensor:
        assert tensor in result.stderr
    assert git(work / ".mint", "fsck", "--strict", ok=False).returncode != 0, (
        "git agrees it is corrupt"
    )
    # Checking out or reading that revision names the tensor (or the object), and changes nothing.
    line = mint_fails(work, "checkout", "dev")
    assert (tensor or oid[:12]) in line or (tensor or oid) in line
    assert snapshot(work) == before
    message = _read_error(work, "dev")
    assert (tensor or oid[:12]) in message or oid in message
    # The manifest is the one object main does not share with dev (tensors are shared or XOR
    # bases, the config is shared), so main must still read in full.
    if kind == "manifest":
        assert _read_error(work, "main") == ""


def _read_error(work: Path, rev: str) -> str:
    """Read a revision's config and tensors through the API; the error message, or '' if it reads."""
    repo = Repository.open(work)
    message = ""
    try:
        revision = repo.read_revision(repo.resolve(rev))
        _ = revision.config_bytes
        revision.tensors()
    except MintError as err:
        message = str(err)
    repo.close()
    return message


def test_fsck_api_names_object_and_tensor(work: Path) -> None:
    oid, tensor = _blob_of(work, "dev", "tensor")
    _flip_loose(work, oid)
    repo = Repository.open(work)
    try:
        report = fsck(repo)
    finally:
        repo.close()
    assert not report.ok
    assert any(oid in p for p in report.problems)
    assert any(tensor in p for p in report.problems)


def test_close_after_reading_a_corrupt_packed_object(work: Path) -> None:
    # A caller that keeps the error (a server logging it, a test) must still be able to close the repository.
    mint(work, "gc")
    oid, tensor = _blob_of(work, "dev", "tensor")
    _flip_packed(work, oid)
    repo = Repository.open(work)
    with pytest.raises(MintError, match=tensor) as kept:
        repo.read_revision(repo.resolve("dev")).tensors()
    repo.close()
    assert kept.value is not None


@pytest.mark.parametrize(
    "path",
    [
        "../evil",
        ".mint/hooks/post-commit",
        "/tmp/evil",
        "a/../../b",
        # A repository of its own below the work tree: its hooks run on the next commit in sub/.
        "sub/.mint/hooks/pre-commit",
        "sub/.MINT./hooks/pre-commit",
        "sub/.git/hooks/pre-commit",
        "MINT~1/hooks/post-commit",  # the NTFS short name of .mint, as git~1 is .git's
        "sub/mint~2/hooks/pre-commit",  # or another's, where mint~1 was taken
    ],
)
def test_a_revision_naming_an_unsafe_path_is_refused(work: Path, path: str) -> None:
    from mintvcs.store import Repository

    repo = Repository.open(work)  # the fixture committed the adapter
    any_blob = repo.read_revision(repo.head_commit() or "").manifest.header_blob
    # The tree holds those a tree can (files/.mint/...), as an earlier mintvcs wrote them.
    in_tree = not path.startswith("/") and ".." not in path.split("/")
    extra = [{"path": path, "blob": any_blob, "executable": True}]
    commit_with_manifest_files(work, extra, in_tree=in_tree)
    before = sorted(p.relative_to(work.parent).as_posix() for p in work.parent.rglob("*"))
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "unsafe" in line and path in line
    after = sorted(p.relative_to(work.parent).as_posix() for p in work.parent.rglob("*"))
    assert after == before and snapshot(work) == state  # nothing written, HEAD unmoved
    # fsck names the hostile revision too.
    result = mint(work, "fsck", ok=False)
    assert result.returncode != 0 and "unsafe" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "path",
    [
        "adapter_config.json/x",
        "adapter_model.safetensors/x",
        "n" * 256 + "/f",
        "sub/" + "\u00e9" * 128,  # 128 characters, 256 bytes
    ],
)
def test_a_path_checkout_could_not_write_is_refused_before_anything_is(
    work: Path, path: str
) -> None:
    # Into an emptied work tree (a fresh clone's), checkout wrote the config and the weights,
    # then failed on such a file: HEAD unmoved, and every tensor modified.
    from mintvcs.objects import FileRecord

    repo = Repository.open(work)
    any_blob = repo.read_revision(repo.head_commit() or "").manifest.header_blob
    # Read (an earlier mintvcs committed some such names), but never written.
    assert FileRecord(path, any_blob).unsafe_reason is not None
    extra = [{"path": path, "blob": any_blob, "executable": False}]
    commit_with_manifest_files(work, extra, in_tree=True)
    for child in work.iterdir():
        if child.name != ".mint":
            child.unlink()
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "unsafe" in line, line
    assert snapshot(work) == state and [p.name for p in work.iterdir()] == [".mint"]


@pytest.mark.parametrize(
    "path",
    [
        "ADAPTER_MODEL.SAFETENSORS",
        "Adapter_Config.json",
        "adapter_config.json.",  # NTFS drops trailing dots and spaces
        "adapter_model.safetensors ",
        "adapter_config.json:x",  # NTFS opens the file's stream x
        "ADAPTE~1.JSO",  # the config's NTFS short name
        "adapter\u200c_model.safetensors",  # HFS+ ignores U+200C
        "ADAPTER_CONFIG.JSON/x",
    ],
)
def test_a_name_a_file_system_takes_for_the_config_or_weights_is_refused(
    work: Path, path: str
) -> None:
    # On macOS or Windows, checkout would write such an extra file after the verified weights
    # or config, over them, and status would call the result clean: refused as git's
    # protectHFS and protectNTFS checks refuse the aliases of .git.
    target = work / path
    target.parent.mkdir(exist_ok=True)
    target.write_bytes((work / WEIGHTS).read_bytes())
    line = mint_fails(work, "commit", "-m", "alias", "--no-verify")
    assert "macOS and Windows take" in line and "cannot be stored" in line, line
    if target.parent == work:
        target.unlink()
    else:
        shutil.rmtree(target.parent)
    # A revision that holds one, as a hostile repository could: refused before anything is
    # written, and fsck names it.
    repo = Repository.open(work)
    any_blob = repo.read_revision(repo.head_commit() or "").manifest.header_blob
    repo.close()
    extra = [{"path": path, "blob": any_blob, "executable": False}]
    commit_with_manifest_files(work, extra, in_tree=True)
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "unsafe" in line and "macOS and Windows take" in line, line
    assert snapshot(work) == state
    result = mint(work, "fsck", ok=False)
    assert result.returncode != 0 and "macOS and Windows take" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "pair",
    [
        ("NOTES.txt", "notes.txt"),
        ("Sub/notes.txt", "sub/notes.txt"),
        ("notes.txt", "notes.txt."),  # NTFS drops trailing dots
        ("caf\u00e9.txt", "cafe\u0301.txt"),  # one name to macOS: NFC and NFD
    ],
)
def test_two_files_a_file_system_opens_as_one_are_refused_at_commit(
    work: Path, pair: tuple[str, str]
) -> None:
    # On macOS or Windows a checkout wrote the second over the first: one file lost, and status
    # called the work tree clean. git commits such names; refused here, naming both.
    from mintvcs.messages import quote_path

    before = git(work / ".mint", "rev-parse", "HEAD").stdout
    for number, path in enumerate(pair):
        (work / path).parent.mkdir(exist_ok=True)
        (work / path).write_text(f"file {number}\n")
    line = mint_fails(work, "commit", "-m", "both", "--no-verify")
    named = {f"{quote_path(a)} and {quote_path(b)}: macOS" for a, b in (pair, pair[::-1])}
    assert any(both in line for both in named) and "open these names as one" in line, line
    assert "rename one" in line and git(work / ".mint", "rev-parse", "HEAD").stdout == before
    for path in pair:
        (work / path).unlink()
    # A revision git (or an earlier mintvcs) committed with both is read, and checked out
    # where the file system keeps both, as git does.
    repo = Repository.open(work)
    blobs = [repo.add_blob(f"file {number}\n".encode()) for number in range(2)]
    repo.close()
    extra = [
        {"path": path, "blob": blob, "executable": False}
        for path, blob in sorted(zip(pair, blobs, strict=True))
    ]
    both = commit_with_manifest_files(work, extra, in_tree=True)
    assert set(pair) <= set(json.loads(mint(work, "show", "--json", both).stdout)["files"])
    mint(work, "checkout", "--force", both)
    assert [(work / p).read_text() for p in pair] == ["file 0\n", "file 1\n"]
    assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True
    mint(work, "fsck")


def test_checkout_tells_of_files_a_file_system_wrote_as_one(tmp_path: Path) -> None:
    # What a case-insensitive file system leaves (none runs here): two names of one file.
    # checkout warns of such paths and never records them clean, so status reads them.
    from mintvcs.adapter import stat_key

    (tmp_path / "README.md").write_text("the last one written\n")
    os.link(tmp_path / "README.md", tmp_path / "readme.md")
    (tmp_path / "other.txt").write_text("apart\n")
    names = ("README.md", "other.txt", "readme.md")
    written = {p: stat_key(os.stat(tmp_path / p)) for p in names}
    assert porcelain._collided(written) == ["README.md", "readme.md"]
    assert porcelain._collided({"other.txt": written["other.txt"]}) == []


def _files_tree_commit(work: Path, names: dict[bytes, bytes], listed: list[str]) -> str:
    """A commit on HEAD whose files/ tree holds `names` (raw name -> content) and whose
    manifest lists the paths `listed`, each with the blob of the content named first."""
    from dulwich.objects import Blob, Tree

    repo = Repository.open(work)
    files = Tree()
    for name, content in names.items():
        blob = Blob.from_string(content)
        repo.add_object(blob)
        files[name] = (0o100644, blob.id)
    repo.add_object(files)
    first = files[next(iter(names))][1].decode()
    manifest_id = git(work / ".mint", "rev-parse", "HEAD:manifest.json").stdout.strip()
    manifest = json.loads(repo.read_blob(manifest_id))
    manifest["files"] = [{"path": p, "blob": first, "executable": False} for p in listed]
    entries = {
        "files": files.id.decode(),
        "manifest.json": repo.add_blob(json.dumps(manifest).encode()),
    }
    repo.close()
    return hostile_commit(work, entries)


def test_tree_names_that_are_not_utf8_are_a_change_made_with_git(work: Path) -> None:
    # git sees two files, \376 and \377; decoded with U+FFFD for each bad byte they were one
    # path, the manifest's only file, so show, checkout, fsck and the server read one file.
    oid = _files_tree_commit(work, {b"\xff": b"seen\n", b"\xfe": b"hidden\n"}, ["\ufffd"])
    listed = git(work / ".mint", "ls-tree", "-r", "--name-only", oid, "files/").stdout
    assert listed == '"files/\\376"\n"files/\\377"\n'
    state = snapshot(work)
    for verb in (("show", oid), ("checkout", "--force", oid)):
        line = mint_fails(work, *verb)
        assert "changed with git" in line and '"files/\\377" is in the tree' in line, line
    assert snapshot(work) == state
    result = mint(work, "fsck", ok=False)
    assert result.returncode != 0 and '"files/\\376" is in the tree' in result.stderr
    # A manifest may spell the name's byte as the surrogate escape that stands for it: no
    # UTF-8 name is that, and such a path is refused whatever the tree holds.
    oid = _files_tree_commit(work, {b"\xff": b"seen\n"}, ["\udcff"])
    line = mint_fails(work, "show", oid)
    assert "lone surrogate" in line, line


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("adapter_config.json", "120000"),  # git checks out a link whose target is the JSON
        ("adapter_config.json", "160000"),  # a submodule, for git
        ("adapter_config.json", "100755"),
        ("manifest.json", "120000"),
    ],
)
def test_a_config_or_manifest_of_another_mode_is_a_change_made_with_git(
    work: Path, name: str, mode: str
) -> None:
    # Read as a file whatever the tree's mode said: git and mintvcs disagreed without a word.
    from dulwich.objects import Tree

    git_dir = work / ".mint"
    repo = Repository.open(work)
    tree = repo.get_object(git(git_dir, "rev-parse", "HEAD^{tree}").stdout.strip())
    assert isinstance(tree, Tree)
    tree[name.encode()] = (int(mode, 8), tree[name.encode()][1])  # the same blob id
    repo.add_object(tree)
    repo.close()
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    oid = git(git_dir, "commit-tree", tree.id.decode(), "-p", head, "-m", "mode").stdout.strip()
    state = snapshot(work)
    for verb in (("show", oid), ("checkout", "--force", oid), ("diff", "HEAD", oid)):
        line = mint_fails(work, *verb)
        assert f"{name} has mode {mode} in the tree, 100644 as written" in line, line
    assert snapshot(work) == state
    git(git_dir, "update-ref", "refs/heads/moded", oid)
    result = mint(work, "fsck", ok=False)
    assert result.returncode != 0 and f"{name} has mode {mode}" in result.stderr


def test_a_file_name_of_255_bytes_is_stored_and_checked_out(work: Path) -> None:
    # The longest name a file system holds: checkout's temporary name for it was too long.
    name = "x" * 250 + ".json"
    (work / name).write_text("{}\n")
    mint(work, "commit", "-m", "a long name", "--no-verify")
    (work / name).unlink()
    mint(work, "checkout", "--force", "main")
    assert (work / name).read_text() == "{}\n"
    assert "nothing to commit" in mint(work, "status").stdout


def test_a_record_must_name_the_blob_of_its_own_tensor(work: Path) -> None:
    # Two records of the same size trade blobs: each blob decodes and matches its own sha256,
    # so only the record's own dtype, shape and sha256 can tell that the values are another's.
    def swap(tensors: list[dict[str, Any]]) -> None:
        same = {}
        for t in tensors:
            first = same.setdefault(t["end"] - t["start"], t)
            if first is not t:
                first["blob"], t["blob"] = t["blob"], first["blob"]
                return
        raise AssertionError("no two tensors of one size")

    commit_with_manifest_files(work, [], edit_tensors=swap)
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "the manifest and its blobs disagree" in line
    assert snapshot(work) == state
    result = mint(work, "fsck", ok=False)
    assert result.returncode != 0 and "disagree" in result.stdout + result.stderr


def test_a_header_that_disagrees_with_the_manifest_is_refused(work: Path) -> None:
    # HEAD's manifest and blobs, with a header that trades two tensors' places: a checkout would
    # put each one's values under the other's name, while diff, status, fsck and the server read
    # the manifest and see HEAD's weights.
    commit_with_manifest_files(work, [], edit_header=swap_two_offsets)
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "safetensors-header" in line and "disagrees with the manifest" in line, line
    assert snapshot(work) == state
    assert "disagrees with the manifest" in mint_fails(work, "diff", "HEAD", "hostile")
    result = mint(work, "fsck", ok=False)
    assert result.returncode == 1 and "disagrees with the manifest" in result.stderr


def test_the_header_must_name_each_tensor_as_the_manifest_does(work: Path) -> None:
    repo = Repository.open(work)
    revision = repo.read_revision(repo.head_commit() or "")
    manifest = revision.manifest
    raw = repo.read_blob(manifest.header_blob)
    repo.close()
    first = manifest.tensors[0]  # starts at 0: `false` equals it in Python, not in safetensors

    def header(edit: Any = None, text: bytes | None = None) -> bytes:
        entries = json.loads(raw[8:])
        if edit is not None:
            edit(entries)
        body = text if text is not None else json.dumps(entries).encode()
        return struct.pack("<Q", len(body)) + body

    assert manifest.header_problem(raw) is None
    # __metadata__ is free, and so is padding.
    assert manifest.header_problem(header(lambda h: h.update(__metadata__={"a": "b"}))) is None
    assert manifest.header_problem(header(lambda h: h.pop("__metadata__", None))) is None
    assert manifest.header_problem(header(text=raw[8:] + b"    ")) is None

    def differs(edit: Any, expected: str, *, text: bytes | None = None) -> None:
        problem = manifest.header_problem(header(edit, text))
        assert problem is not None and expected in problem, problem

    differs(swap_two_offsets, "in the manifest, and is")
    differs(lambda h: h[first.name].update(dtype="F16"), f"tensor {first.name} is ")
    differs(lambda h: h[first.name].update(shape=[float(d) for d in first.shape]), first.name)
    differs(lambda h: h[first.name].update(data_offsets=[False, first.end]), first.name)
    differs(lambda h: h.pop(first.name), "is missing there")
    differs(lambda h: h.update(extra=h[first.name]), "it lists tensor 'extra'")
    differs(None, "not valid JSON", text=b"{")
    differs(None, "not a JSON object", text=b"[]")
    problem = manifest.header_problem(raw + b" ")
    assert problem is not None and "length prefix" in problem, problem


@pytest.mark.parametrize(
    "shape",
    [
        [1 << 20, 1 << 20],  # 4 TiB: numpy's MemoryError
        [1 << 31, 1 << 31, 4],  # 2**66 bytes, past what an index addresses: numpy's ValueError
    ],
    ids=["4TiB", "past-int64"],
)
def test_a_revision_claiming_terabytes_is_one_error_line(work: Path, shape: list[int]) -> None:
    def huge(tensors: list[dict[str, Any]]) -> None:
        last = tensors[-1]  # consistent with itself
        last.update(dtype="F32", shape=shape, end=last["start"] + 4 * math.prod(shape))

    commit_with_manifest_files(work, [], edit_tensors=huge)
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", "hostile")
    assert "more than this machine can allocate" in line, line
    # diff reads only the tensors whose values it compares: a new shape is told, not read.
    changed = json.loads(mint(work, "diff", "HEAD", "hostile", "--json").stdout)["tensors"]
    assert [(t["status"], t["shape_b"]) for t in changed if t["status"] != "unchanged"] == [
        ("reshaped", shape)
    ]
    assert snapshot(work) == state


def test_log_and_show_escape_control_characters_and_survive_any_date(work: Path) -> None:
    # An OSC sequence would retitle (or, OSC 52, write the clipboard of) the reader's terminal.
    commit_with_manifest_files(
        work, [], message=b"\x1b]0;pwned\x07subject\n\nbody\tline\n", when=10**17
    )
    for args in (("log", "hostile"), ("log", "--oneline", "hostile"), ("show", "hostile")):
        out = mint(work, *args).stdout
        assert "\x1b" not in out and "\\x1b]0;pwned\\x07subject" in out, out
    assert "@100000000000000000 +0000" in mint(work, "show", "hostile").stdout
    # Tabs expanded to 8 columns in log and show, as git's medium format; kept in --oneline.
    assert "\n    body    line\n" in mint(work, "log", "hostile").stdout
    assert "\n    body    line\n" in mint(work, "show", "hostile").stdout
    git_log = git(work / ".mint", "log", "-1", "hostile").stdout
    assert "\n    body    line\n" in git_log


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (b"\xff\xfe{}", "not valid JSON"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
    ],
    ids=["not-utf8", "list", "deep"],
)
def test_a_config_blob_that_is_not_a_json_object_is_one_error_line(
    work: Path, config: bytes, expected: str
) -> None:
    from mintvcs.store import Repository

    blob = Repository.open(work).add_blob(config)
    oid = hostile_commit(work, {"adapter_config.json": blob})
    line = mint_fails(work, "show", "--json", oid)
    assert expected in line and "adapter_config.json" in line, line


def test_a_repository_config_that_reads_without_end_is_refused_or_ignored(work: Path) -> None:
    config = work / ".mint" / "config"
    original = config.read_text()
    # git reads includes; one naming /dev/zero would be read for ever (git: "bad config line").
    # Ours refuses to open it, and an include that cannot be read is skipped, as git skips one.
    config.write_text(original + "[include]\n\tpath = /dev/zero\n")
    assert "On branch main" in mint(work, "status").stdout
    config.unlink()
    config.symlink_to("/dev/zero")
    line = mint_fails(work, "log")
    assert "is not a regular file under 1 MiB" in line, line
    config.unlink()
    # A real include still counts: the identity a user keeps in an included file.
    (work / "identity.conf").write_text("[user]\n\tname = Work Me\n\temail = me@work.example\n")
    config.write_text(original + f"[include]\n\tpath = {work / 'identity.conf'}\n")
    env_free = {k: v for k, v in ENV.items() if not k.startswith(("GIT_AUTHOR", "GIT_COMMITTER"))}
    mutate(work, seed=21)
    subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "commit", "-m", "x", "--no-verify"],
        cwd=work,
        env=env_free,
        check=True,
        capture_output=True,
    )
    assert "Work Me <me@work.example>" in mint(work, "log").stdout.split("\n\n")[0]
    config.write_text(original)


def test_checkout_refuses_an_untracked_file_where_the_revision_has_a_directory(
    work: Path,
) -> None:
    (work / "notes").mkdir()
    (work / "notes" / "x.txt").write_text("v1\n")
    with_notes = json.loads(mint(work, "commit", "-m", "notes", "--no-verify", "--json").stdout)
    mint(work, "checkout", with_notes["parent"])
    (work / "notes").write_text("my own notes, not in any revision\n")
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", with_notes["commit"])
    assert "is a file, but the revision has notes/x.txt inside it" in line, line
    assert snapshot(work) == state  # nothing written: weights, config and notes as they were
    assert (work / "notes").read_text() == "my own notes, not in any revision\n"
    (work / "notes").unlink()
    mint(work, "checkout", with_notes["commit"])
    assert (work / "notes" / "x.txt").read_text() == "v1\n"
    # And the other way: a revision with a file `notes` replaces the tracked directory notes/.
    (work / "notes" / "x.txt").unlink()
    (work / "notes").rmdir()
    (work / "notes").write_text("now a file\n")
    as_file = json.loads(mint(work, "commit", "-m", "file", "--no-verify", "--json").stdout)
    mint(work, "checkout", with_notes["commit"])
    assert (work / "notes").is_dir()
    mint(work, "checkout", as_file["commit"])
    assert (work / "notes").read_text() == "now a file\n"
    (work / "notes").unlink()
    mint(work, "checkout", "--force", with_notes["commit"])
    (work / "notes" / "mine.txt").write_text("untracked\n")  # not the checkout's to remove
    line = mint_fails(work, "checkout", "--force", as_file["commit"])
    assert "is a directory holding files of its own" in line, line
    assert (work / "notes" / "mine.txt").read_text() == "untracked\n"


def test_a_ref_name_that_is_not_utf8_is_listed_kept_and_repacked(work: Path) -> None:
    # git allows any bytes in ref names, and a clone brings them along.
    head = mint(work, "log", "--json").stdout
    oid = json.loads(head)[0]["commit"]
    packed = work / ".mint" / "packed-refs"
    old = (
        packed.read_bytes()
        if packed.exists()
        else b"# pack-refs with: peeled fully-peeled sorted \n"
    )
    packed.write_bytes(old + oid.encode() + b" refs/heads/caf\xe9\n")
    for args in (("log", "--oneline"), ("branch",), ("fsck",), ("gc",), ("branch",)):
        result = mint(work, *args)
        assert "Traceback" not in result.stderr, (args, result.stderr)
    assert "caf" in mint(work, "branch").stdout
    assert b"refs/heads/caf\xe9\n" in packed.read_bytes()  # gc kept it, byte for byte


def test_ref_files_linked_to_other_files_never_show_their_content(
    work: Path, tmp_path: Path
) -> None:
    # A ref or packed-refs unpacked as a link to any readable file: its bytes were quoted in
    # the error (the server sends it to clients); git's "ignoring broken ref" quotes none.
    secret = tmp_path / "secret"
    secret.write_text("0123 S3CRETHASH:19000\nroot:S3CRETHASH\n")
    git_dir = work / ".mint"
    (git_dir / "refs" / "heads" / "leak").symlink_to(secret)
    line = mint_fails(work, "show", "leak")
    assert "refs/heads/leak" in line and "S3CRET" not in line, line
    (git_dir / "refs" / "heads" / "leak").unlink()
    packed = git_dir / "packed-refs"
    if packed.exists():
        packed.rename(tmp_path / "packed-refs")
    packed.symlink_to(secret)
    line = mint_fails(work, "show", "nope")
    assert "packed-refs: bad line at byte 0" in line and "S3CRET" not in line, line


def test_a_loose_object_that_is_a_link_to_a_device_is_refused(work: Path) -> None:
    manifest = subprocess.run(
        ["git", "--git-dir", str(work / ".mint"), "rev-parse", "HEAD:manifest.json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    loose = work / ".mint" / "objects" / manifest[:2] / manifest[2:]
    if not loose.exists():
        pytest.skip("the manifest blob is packed in this fixture")
    saved = loose.read_bytes()
    loose.unlink()
    loose.symlink_to("/dev/zero")  # read without end, it would fill the memory
    try:
        line = mint_fails(work, "show")
        assert manifest in line and "cannot be read" in line, line
    finally:
        loose.unlink()
        loose.write_bytes(saved)


def test_a_manifest_that_inflates_to_gigabytes_is_refused_unread(work: Path) -> None:
    from mintvcs.store import MAX_METADATA_BYTES, Repository

    repo = Repository.open(work)
    manifest = repo.read_revision(repo.head_commit() or "").manifest.to_bytes()
    # Valid JSON, then whitespace: a loose object of ~65 kB that inflates past the limit.
    bomb = repo.add_blob(manifest + b" " * (MAX_METADATA_BYTES + 1))
    oid = hostile_commit(work, {"manifest.json": bomb})
    line = mint_fails(work, "show", oid)
    assert "claims" in line and "more than a manifest.json may hold" in line, line
    # The same once git has packed it (deflated, as a clone brings it).
    git = ["git", "--git-dir", str(work / ".mint")]
    # Deflated at git's usual level (this repository's own config stores blobs uncompressed).
    subprocess.run(
        [*git, "-c", "pack.compression=6", "repack", "-a", "-d", "-F", "-q"],
        check=True,
        capture_output=True,
    )
    subprocess.run([*git, "prune-packed"], check=True, capture_output=True)
    assert not (work / ".mint" / "objects" / bomb[:2] / bomb[2:]).exists()
    line = mint_fails(work, "show", oid)
    assert "claims" in line and "more than a manifest.json may hold" in line, line


def test_a_small_manifest_delta_on_a_huge_base_is_refused_unread(work: Path) -> None:
    import hashlib
    import zlib

    from mintvcs.packs import _pack_entry_header
    from mintvcs.store import MAX_METADATA_BYTES
    from tests.mintvcs.test_hostile_maintenance import _ofs_distance, _size_varint

    # A pack of two entries: a blob of whitespace just over the limit, and a 100-byte
    # "manifest" as a delta on it: small itself, but reading it inflates the base.
    size = MAX_METADATA_BYTES + 1
    delta = _size_varint(size) + _size_varint(100) + bytes([0x80 | 0x10, 100])
    body = bytearray(b"PACK" + struct.pack(">II", 2, 2))
    at = len(body)
    body += _pack_entry_header(3, size) + zlib.compress(b" " * size, 1)
    here = len(body)
    body += _pack_entry_header(6, len(delta)) + _ofs_distance(here - at) + zlib.compress(delta)
    body += hashlib.sha1(body).digest()
    pack = work / ".mint" / "objects" / "pack" / "pack-bomb.pack"
    pack.parent.mkdir(exist_ok=True)
    pack.write_bytes(bytes(body))
    subprocess.run(["git", "index-pack", str(pack)], check=True, capture_output=True)
    small = hashlib.sha1(b"blob 100\0" + b" " * 100).hexdigest()
    line = mint_fails(work, "show", hostile_commit(work, {"manifest.json": small}))
    assert f"claims {size:,} bytes" in line, line


def _in_time(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mintvcs ARGS`, which must end within 30 s: a command that blocks opening a FIFO fails
    the test instead of hanging it."""
    return mint(cwd, *args, ok=False, timeout=30)


def _fifo_at(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)  # opened for reading or writing without O_NONBLOCK, it waits for ever


@pytest.mark.parametrize("verb", [("checkout", "--force", "HEAD~1"), ("reset", "--hard", "HEAD")])
def test_a_fifo_where_the_weights_go_is_replaced_not_waited_on(
    work: Path, verb: tuple[str, ...]
) -> None:
    # git 2.39's reset --hard replaces a FIFO standing where a tracked file goes.
    want = git(work / ".mint", "rev-parse", f"{verb[-1]}:manifest.json").stdout
    _fifo_at(work / WEIGHTS)
    result = _in_time(work, *verb)
    assert result.returncode == 0, result.stderr
    assert (work / WEIGHTS).is_file() and not (work / WEIGHTS).is_fifo()
    status = json.loads(_in_time(work, "status", "--json").stdout)
    assert status["clean"] is True, status
    assert git(work / ".mint", "rev-parse", "HEAD:manifest.json").stdout == want


def test_fifos_where_files_are_read_are_not_waited_on(work: Path, tmp_path: Path) -> None:
    # An extra file of a revision the work tree was left holding (commit --from moved HEAD
    # under it) is read to see whether it is still that revision's: a FIFO there hung checkout.
    (work / "notes.txt").write_text("n\n")
    mint(work, "commit", "-m", "with notes", "--no-verify")
    source = copy_adapter(work, tmp_path / "source")
    (source / "notes.txt").unlink()
    mutate(source, seed=7)
    mint(work, "commit", "--from", str(source), "-m", "without", "--no-verify")
    _fifo_at(work / "notes.txt")
    result = _in_time(work, "checkout", "--force", "HEAD")
    assert result.returncode == 0, result.stderr
    assert (work / "notes.txt").is_fifo()  # not that revision's content: left, as untracked
    (work / "notes.txt").unlink()
    # The config, read by status's quick check of a clean work tree.
    mint(work, "reset", "--hard")
    _fifo_at(work / CONFIG)
    result = _in_time(work, "status")
    assert result.returncode == 0 and "removed:   adapter_config.json" in result.stdout, result
    mint(work, "reset", "--hard")
    # A ref: git 2.39 hangs on it too. It is broken, left out of listings with a warning.
    os.mkfifo(work / ".mint" / "refs" / "heads" / "pipe")
    result = _in_time(work, "branch")
    assert result.returncode == 0 and "dev" in result.stdout, result
    assert "refs/heads/pipe" in result.stderr and "not a regular file" in result.stderr
    line = _in_time(work, "show", "pipe").stderr
    assert "refs/heads/pipe" in line and "not a regular file" in line, line


def test_fifos_where_reflogs_go_are_not_waited_on(work: Path) -> None:
    # As git's files backend, a reflog is a regular file: anything else there is none. gc read
    # HEAD's through a plain open and hung; git gc goes through (git reflog hangs, as a commit
    # appending to it does: one is refused here, naming it, and moves nothing).
    mint(work, "reset", "--hard")
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout
    _fifo_at(git_dir / "logs" / "HEAD")
    result = _in_time(work, "gc")
    assert result.returncode == 0, result.stderr
    assert _in_time(work, "log", "-n", "1", "--oneline", "HEAD@{1}").returncode == 0
    mutate(work, seed=11)
    result = _in_time(work, "commit", "-m", "next", "--no-verify")
    assert result.returncode != 0 and "logs/HEAD" in result.stderr, result
    assert git(git_dir, "rev-parse", "HEAD").stdout == head
    assert not list(git_dir.rglob("*.lock"))
    (git_dir / "logs" / "HEAD").unlink()
    _fifo_at(git_dir / "logs" / "refs" / "heads" / "main")
    result = _in_time(work, "gc")
    assert result.returncode == 0, result.stderr
    git(git_dir, "fsck", "--strict")


def test_checkout_does_not_write_through_a_symlinked_directory(work: Path, tmp_path: Path) -> None:
    (work / "sub").mkdir()
    (work / "sub" / "notes.txt").write_text("v1\n")
    first = json.loads(mint(work, "commit", "-m", "with sub", "--no-verify", "--json").stdout)
    (work / "sub" / "notes.txt").unlink()
    (work / "sub").rmdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "sub").symlink_to(outside, target_is_directory=True)
    line = refused(work, "checkout", "--force", first["commit"])
    assert "symlink" in line and "sub/notes.txt" in line
    assert list(outside.iterdir()) == []


def test_checkout_does_not_remove_through_a_symlinked_directory(work: Path, tmp_path: Path) -> None:
    # HEAD has sub/notes.txt, the target does not, and sub is now a link to a directory elsewhere.
    (work / "sub").mkdir()
    (work / "sub" / "notes.txt").write_text("v1\n")
    with_sub = json.loads(mint(work, "commit", "-m", "with sub", "--no-verify", "--json").stdout)
    outside = tmp_path / "outside"
    (work / "sub").rename(outside)
    (work / "sub").symlink_to(outside, target_is_directory=True)
    line = mint_fails(work, "checkout", "--force", with_sub["parent"])
    assert "symlink" in line and "sub/notes.txt" in line
    assert (outside / "notes.txt").read_text() == "v1\n"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t[0].update(start=3 << 30, end=(3 << 30) + t[0]["end"]), "gap or overlap"),
        (lambda t: t[1].update(start=t[1]["start"] + 4, end=t[1]["end"] + 4), "gap or overlap"),
        (lambda t: t[0].update(end="12"), "offsets"),
        (lambda t: t[0].update(start=-4), "offsets"),
        (lambda t: t[0].update(shape=[10**9, 10**9]), "does not fill"),
        (lambda t: t[1].update(name=t[0]["name"]), "twice"),
        (lambda t: t[0].update(name="a/b"), "cannot be stored"),
        (lambda t: t[0].update(name="a\\b"), "cannot be stored"),
        (lambda t: t[0].update(name=".."), "cannot be stored"),
        (lambda t: t[0].update(name="a\x1fb"), "control character"),
        (lambda t: t[0].update(name="x\ud800"), "lone surrogate"),
        (lambda t: t[0].update(name=".GIT"), "git fsck"),
        (lambda t: t[0].update(blob=t[0]["blob"].upper()), "blob"),
        (lambda t: t[0].update(sha256=t[0]["sha256"][:-1]), "sha256"),
        (lambda t: t[0].update(depth=-1), "depth"),
        (lambda t: t[0].update(shape=[-1, 4]), "shape"),
        (lambda t: t.reverse() or t[0].update(end=t[0]["end"] + 2), "does not fill"),
    ],
    ids=[
        "far-offset", "gap", "string-end", "negative", "huge-shape", "duplicate", "slash",
        "backslash", "dotdot", "control", "surrogate", "dotgit", "blob", "sha256", "depth",
        "negative-dim", "unordered-overlap",
    ],
)  # fmt: skip
def test_a_manifest_that_lies_about_its_layout_is_refused(work: Path, edit, expected: str) -> None:
    from mintvcs.objects import CorruptManifestError, Manifest
    from mintvcs.store import Repository

    repo = Repository.open(work)
    raw = json.loads(repo.read_revision(repo.head_commit() or "").manifest.to_bytes())
    edit(raw["tensors"])
    with pytest.raises(CorruptManifestError, match=expected):
        Manifest.from_bytes(json.dumps(raw).encode())


def test_manifest_records_are_built_and_checked_as_the_constructor_does(work: Path) -> None:
    # Records are built from their entries with positional arguments (37k of them a read of a
    # large MoE adapter): the same records, equal and hashable, in any order the manifest lists.
    from mintvcs.objects import Manifest, TensorRecord
    from mintvcs.store import Repository

    repo = Repository.open(work)
    manifest = repo.read_revision(repo.head_commit() or "").manifest
    raw = json.loads(manifest.to_bytes())
    for entry, record in zip(raw["tensors"], manifest.tensors, strict=True):
        built = TensorRecord.from_entry(entry)
        assert built == record == TensorRecord(**{**entry, "shape": tuple(entry["shape"])})
        assert hash(built) == hash(record) and repr(built) == repr(record)
    with pytest.raises(KeyError, match="depth"):
        TensorRecord.from_entry({k: v for k, v in raw["tensors"][0].items() if k != "depth"})
    raw["tensors"].reverse()  # out of file order: still a layout that tiles the data section
    reread = Manifest.from_bytes(json.dumps(raw).encode())
    assert reread.tensors == tuple(reversed(manifest.tensors))
    assert reread.to_bytes() != manifest.to_bytes()


def test_manifest_file_paths_must_not_collide(work: Path) -> None:
    from mintvcs.objects import CorruptManifestError, Manifest
    from mintvcs.store import Repository

    repo = Repository.open(work)
    manifest = repo.read_revision(repo.head_commit() or "").manifest
    raw = json.loads(manifest.to_bytes())
    blob = manifest.header_blob
    for files, expected in (
        ([{"path": "a", "blob": blob}, {"path": "a/b", "blob": blob}], "also the directory"),
        ([{"path": "a", "blob": blob}, {"path": "a", "blob": blob}], "twice"),
        ([{"path": "x", "blob": blob, "executable": "yes"}], "executable"),
    ):
        raw["files"] = files
        with pytest.raises(CorruptManifestError, match=expected):
            Manifest.from_bytes(json.dumps(raw).encode())
    # A name checkout may not write is read, and refused where it would be written.
    raw["files"] = [{"path": "adapter_model.safetensors", "blob": blob}]
    (record,) = Manifest.from_bytes(json.dumps(raw).encode()).files
    assert "weights file" in (record.unsafe_reason or "")
    with pytest.raises(CorruptManifestError, match="nested too deeply"):
        Manifest.from_bytes(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to chown")
def test_hooks_of_a_repository_owned_by_someone_else_do_not_run(work: Path, tmp_path: Path) -> None:
    # git's safe.directory rule (CVE-2022-24765): another user's .mint must not run code as you.
    marker = tmp_path / "ran"
    for name in ("pre-commit", "post-commit"):
        hook = work / ".mint" / "hooks" / name
        hook.write_text(f"#!/bin/sh\necho {name} >> {marker}\n")
        hook.chmod(0o755)
    nobody = 65534
    for path in [work / ".mint", *(work / ".mint").rglob("*")]:
        os.chown(path, nobody, nobody, follow_symlinks=False)
    mutate(work, seed=9)
    # Past the ownership check that every command makes (safe.directory lifts it, as in git):
    # the hooks are refused all the same.
    safe = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory"}
    safe["GIT_CONFIG_VALUE_0"] = "*"
    refused = mint(work, "commit", "-m", "x", ok=False, env=safe)
    line = refused.stderr.strip()
    assert refused.returncode != 0 and line.startswith("error:"), refused.stderr
    assert "not running" in line and "uid 65534" in line and "--no-verify" in line
    result = mint(work, "commit", "-m", "x", "--no-verify", env=safe)
    assert "warning: not running" in result.stderr  # post-commit is skipped, the commit is made
    assert not marker.exists()


def test_metadata_cannot_drive_the_terminal(work: Path) -> None:
    mutate(work, seed=11)
    mint(work, "commit", "-m", "m", "--no-verify", "--meta", "note=\x1b]52;c;aGk=\x07 done")
    out = mint(work, "show").stdout
    assert "\x1b" not in out and "\x07" not in out
    assert 'meta note: "\\033]52;c;aGk=\\a done"' in out


def test_a_lying_pack_index_is_a_clean_error(work: Path) -> None:
    mint(work, "gc")
    (idx,) = (work / ".mint" / "objects" / "pack").glob("pack-*.idx")
    data = bytearray(idx.read_bytes())
    data[8 + 4 * 255 : 8 + 4 * 256] = (2**31 - 1).to_bytes(4, "big")  # the fan-out's total count
    idx.write_bytes(bytes(data))
    result = mint(work, "fsck", ok=False)  # `mint` fails the test on any traceback
    assert result.returncode != 0
    assert mint(work, "gc", ok=False).returncode == 128


def test_a_pack_entry_claiming_more_than_a_stream_can_hold_is_a_clean_error(work: Path) -> None:
    # The head commit alone in a pack whose entry header claims 2**63 bytes: our pack reader
    # handed that to zlib as its output limit, which no Py_ssize_t holds (an OverflowError
    # traceback); it is damage, which dulwich then names.
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    name = git(
        git_dir, "pack-objects", "-q", str(git_dir / "objects/pack/pack"), input_text=head + "\n"
    ).stdout.strip()
    loose_path(work, head).unlink()
    pack = git_dir / "objects" / "pack" / f"pack-{name}.pack"
    data = bytearray(pack.read_bytes())
    assert data[12] >> 4 & 7 == 1  # the commit's entry, right after the pack header
    size = 1 << 63
    claim = bytearray([0x80 | 1 << 4 | size & 0x0F])
    size >>= 4
    while size >> 7:
        claim.append(0x80 | size & 0x7F)
        size >>= 7
    claim.append(size)
    at = 13
    while data[at - 1] & 0x80:  # past the entry's own size bytes
        at += 1
    pack.chmod(0o644)
    pack.write_bytes(bytes(data[:12] + claim + data[at:]))
    line = mint_fails(work, "log")  # `mint` fails the test on any traceback
    assert head in line and "corrupt" in line, line


def test_a_corrupt_head_or_config_is_named(work: Path) -> None:
    head = (work / ".mint" / "HEAD").read_bytes()
    (work / ".mint" / "HEAD").write_text("garbage\n")
    for verb in ("log", "show"):
        line = mint_fails(work, verb)
        assert "corrupt ref file" in line and "HEAD" in line, line  # not "make a first commit"
    (work / ".mint" / "HEAD").write_bytes(head)
    config = work / ".mint" / "config"
    config.write_text(config.read_text() + "[core\nbroken")
    for verb in ("log", "fsck", "gc"):
        line = mint_fails(work, verb)
        assert "config cannot be read" in line, line


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GIT_AUTHOR_NAME", "Eve <evil@x> 0 +0000"),
        ("GIT_AUTHOR_NAME", "Eve\nparent " + "0" * 40),
        ("GIT_AUTHOR_EMAIL", "eve@x>"),
    ],
)
def test_identity_that_would_forge_commit_headers(
    work: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # git drops a newline, `<` and `>` from a name or email (and trims them off its ends), so
    # that no value can forge the commit's header lines; mintvcs does the same, and the commit
    # passes git fsck --strict with the identity git writes.
    monkeypatch.setenv(variable, value)
    ident = ["git", "--git-dir", str(work / ".mint"), "var", "GIT_AUTHOR_IDENT"]  # this env's
    by_git = subprocess.run(ident, capture_output=True, text=True, check=True).stdout
    by_git = by_git.rsplit(" ", 2)[0]
    mutate(work, seed=11)
    porcelain.commit(Repository.open(work), "x", verify=False, show_progress=False)
    head = git(work / ".mint", "cat-file", "-p", "HEAD").stdout.split("\n\n")[0].splitlines()
    assert [line.split(" ")[0] for line in head] == ["tree", "parent", "author", "committer"]
    assert head[2].rsplit(" ", 2)[0] == f"author {by_git}"
    git_fsck(work)


@pytest.mark.parametrize("path", [".gitmodules", "sub/.Git", "sub/GITMOD~1"])
def test_extra_files_git_would_refuse_are_not_committed(work: Path, path: str) -> None:
    target = work / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("[submodule]\n")
    before = snapshot(work)
    line = refused(work, "commit", "-m", "x", "--no-verify")
    assert "git" in line and repr(path.rsplit("/", 1)[-1]) in line
    assert_intact(work, before)


def test_trees_nested_thousands_deep_are_one_error_line(work: Path) -> None:
    # Deeper than Python's recursion limit, as git stores and clones it: every reader walked
    # trees recursively and died with a RecursionError traceback, fsck at the first such revision.
    from dulwich.objects import Tree

    repo = Repository.open(work)
    hello = repo.add_blob(b"hello\n")
    nested = Tree()
    nested[b"f"] = (0o100644, hello.encode())
    repo.add_object(nested)
    for _ in range(1500):
        outer = Tree()
        outer[b"d"] = (0o040000, nested.id)
        repo.add_object(outer)
        nested = outer
    repo.close()
    deep_tree = hostile_commit(work, {"d": nested.id.decode()})
    mint(work, "branch", "deep-tree", deep_tree)
    # The same path listed by the manifest: refused as it is read, before any tree is walked.
    deep_path = commit_with_manifest_files(
        work, [{"path": "/".join(["d"] * 1500) + "/f", "blob": hello, "executable": False}]
    )
    state = snapshot(work)
    for args in (("show", deep_tree), ("diff", "HEAD", deep_tree), ("checkout", deep_tree)):
        line = mint_fails(work, *args)
        assert "nests more than 256 levels deep" in line, line
    for args in (("show", deep_path), ("checkout", "--force", deep_path)):
        line = mint_fails(work, *args)
        assert "it has 1501 components, more than the 256" in line, line
        assert len(line) < 1000
    assert snapshot(work) == state
    # fsck reports each and goes on: main's two revisions (dev is the first) are still checked.
    # A notes ref holding the deep commit has its trees walked as git fsck walks them.
    git(work / ".mint", "update-ref", "refs/notes/deep", deep_tree)
    result = mint(work, "fsck", ok=False)
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(problems) == 3, result.stderr
    assert any("refs/notes/deep" in p and "256 levels" in p for p in problems), problems
    assert any(deep_tree[:12] in p and "256 levels" in p for p in problems), problems
    assert any(deep_path[:12] in p and "1501 components" in p for p in problems), problems
    assert "2 revisions" in result.stdout, result.stdout


def test_a_path_deeper_than_mintvcs_stores_is_not_committed(work: Path) -> None:
    target = work.joinpath(*["d"] * 300, "notes.txt")
    target.parent.mkdir(parents=True)
    target.write_text("deep\n")
    line = refused(work, "commit", "-m", "x", "--no-verify")
    assert "more than the 256 mintvcs stores" in line or "more than 256 levels" in line, line


def test_checkout_makes_deep_directories_without_recursing(tmp_path: Path) -> None:
    # pathlib's mkdir(parents=True) recursed once per missing level.
    target = tmp_path.joinpath(*["d"] * 1200, "f")
    try:
        porcelain._write_atomic(target, b"x")
        assert target.read_bytes() == b"x"
    finally:
        # Removed here, with rm (no recursion): shutil.rmtree, which pytest's cleanup of old
        # temporary directories uses, recurses once per level too and would fail on this one.
        subprocess.run(["rm", "-rf", str(tmp_path / "d")], check=True)


# ------------------------------------------------------------ unusual adapters (codec review)
def _with_extra(tmp_path: Path, work: Path, name: str, extra: tuple[str, list[int], bytes]) -> Path:
    """A copy of the work tree's adapter, its weights rewritten by hand with one more tensor."""
    from safetensors.numpy import load_file

    bad = copy_adapter(work, tmp_path / name)
    tensors: dict[str, tuple[str, list[int], bytes]] = {
        key: ("F32", list(value.shape), value.astype("<f4").tobytes())
        for key, value in load_file(str(bad / WEIGHTS)).items()
    }
    write_safetensors(bad / WEIGHTS, {**tensors, "extra.t": extra}, {"format": "pt"})
    return bad


@pytest.mark.parametrize(
    ("dtype", "raw"),
    [("F8_E4M3", bytes([0x38, 0x7F])), ("F8_E5M2", bytes([0x3C, 0x7C])), ("F8_E8M0", b"\x7f\xff")],
)
def test_non_finite_float8_is_refused_too(
    work: Path, tmp_path: Path, dtype: str, raw: bytes
) -> None:
    # The NaN (E4M3, E8M0) and Inf (E5M2) passed the check that refuses them in wider floats.
    bad = _with_extra(tmp_path, work, dtype, (dtype, [2], raw))
    assert "non-finite" in refused(work, "commit", "-m", "bad", "--from", str(bad))


@pytest.mark.parametrize(("dtype", "raw"), [("F8_E8M0", b"\x7f\x80"), ("C64", b"\0" * 16)])
def test_dtypes_the_format_lists_are_stored_bit_exact(
    work: Path, tmp_path: Path, dtype: str, raw: bytes
) -> None:
    # They were refused as an "unknown dtype" of a corrupt file.
    good = _with_extra(tmp_path, work, dtype, (dtype, [2], raw))
    mint(work, "commit", "-m", dtype, "--from", str(good))
    mint(work, "checkout", "--force", "HEAD")
    assert (work / WEIGHTS).read_bytes() == (good / WEIGHTS).read_bytes()


def test_malformed_names_shapes_and_files_are_one_error_line(work: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lora = {Q_A: ("F32", [8, 64], random_f32(rng, [8, 64]))}
    # Each was a traceback (true read as 1; a lone surrogate or non-UTF-8 name reaching the
    # tree writer); a FIFO hung the commit for ever.
    shaped = handmade_adapter(tmp_path / "bool", lora)
    write_safetensors(shaped / WEIGHTS, {Q_A: ("F32", [True, 64], lora[Q_A][2][: 64 * 4])})
    assert "invalid shape" in refused(work, "commit", "-m", "x", "--from", str(shaped))
    surrogate = handmade_adapter(tmp_path / "surrogate", lora)
    write_safetensors(surrogate / WEIGHTS, {Q_A.replace("lora_A", "lo\ud800A"): lora[Q_A]})
    assert "not valid Unicode" in refused(work, "commit", "-m", "x", "--from", str(surrogate))
    odd = copy_adapter(work, tmp_path / "odd")
    (odd / "notes").mkdir()
    os.mkfifo(odd / "notes" / "pipe")
    assert "not a regular file" in refused(work, "commit", "-m", "x", "--from", str(odd))
    os.unlink(odd / "notes" / "pipe")
    with open(os.fsencode(odd / "notes") + b"/caf\xe9.txt", "wb") as latin1:
        latin1.write(b"a latin-1 name")
    assert "not UTF-8" in refused(work, "commit", "-m", "x", "--from", str(odd))


def test_a_change_of_the_executable_bit_alone_is_a_change(work: Path) -> None:
    script = work / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    mint(work, "commit", "-m", "script", "--no-verify")
    script.chmod(0o644)
    # status said clean (and checkout overwrote it) while commit recorded a new revision.
    assert "run.sh" in mint(work, "status").stdout


def test_metadata_too_large_to_read_back_is_refused_before_anything_is_written(
    work: Path, tmp_path: Path
) -> None:
    big = copy_adapter(work, tmp_path / "big")
    config = json.loads((big / CONFIG).read_text())
    (big / CONFIG).write_text(json.dumps({**config, "notes": "x" * (65 << 20)}))
    # It was committed, and every later read of it failed as if the store were damaged.
    assert "metadata may hold" in refused(work, "commit", "-m", "big", "--from", str(big))


def test_diff_names_dtypes_it_has_no_statistics_for(work: Path, tmp_path: Path) -> None:
    mint(
        work,
        "commit",
        "-m",
        "u16",
        "--from",
        str(_with_extra(tmp_path, work, "a", ("BOOL", [3], b"\1\0\1"))),
    )
    mint(
        work,
        "commit",
        "-m",
        "u8",
        "--from",
        str(_with_extra(tmp_path, work, "b", ("U8", [3], b"\1\0\2"))),
    )
    # It read `retyped extra.t [3] -> [3]`, like a reshape with no dtypes; then it named U8,
    # which has statistics, not BOOL, which has none.
    assert (
        "retyped   extra.t  [3]  BOOL -> U8  (no statistics for BOOL)"
        in mint(work, "diff", "HEAD~1", "HEAD").stdout
    )


def test_a_trainer_output_directory_names_its_last_checkpoint(tmp_path: Path) -> None:
    # `commit --from output_dir` of a Trainer run: the hint used to name the alphabetically
    # first checkpoint (checkpoint-10 of 2..40), not the last one.
    from mintvcs.adapter import NotAnAdapterError, read_adapter

    for step in (2, 9, 10, 40):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    with pytest.raises(NotAnAdapterError) as info:
        read_adapter(tmp_path)
    assert "found checkpoint-40/adapter_config.json and 3 more such directories" in str(info.value)
    assert f"use --from {tmp_path / 'checkpoint-40'})" in str(info.value)


@pytest.mark.parametrize(
    "path",
    [
        ".gitmodules",  # each committed by an earlier mintvcs (before 16ead5f)
        "sub/.gitmodules",
        "back\\slash.txt",
        "ctl\x01name.txt",
        "sub/.Mint/x",
        "ADAPTER_MODEL.SAFETENSORS",  # refused since afa5d46
    ],
)
def test_a_revision_with_a_name_an_earlier_mintvcs_accepted_is_read(work: Path, path: str) -> None:
    # docs/format.md §7: an earlier mintvcs's revision is read. The name is refused where a
    # file would be written (checkout), not where the revision is read: show, diff, the
    # server's load and fsck called the whole revision a corrupt manifest, and a work tree
    # whose HEAD was on it could not leave it (checkout --force and reset --hard failed too).
    from mintvcs.messages import quote_path
    from mintvcs.serve import StoreSource

    repo = Repository.open(work)
    before = repo.head_commit() or ""
    content = b'[submodule "x"]\n\tpath = x\n\turl = https://example.com/x\n'
    blob = repo.add_blob(content)
    repo.close()
    extra = [{"path": path, "blob": blob, "executable": False}]
    old = commit_with_manifest_files(work, extra, in_tree=True)  # as that mintvcs wrote it
    # git itself keeps it: no damage either way.
    git(work / ".mint", "fsck", "--strict")
    assert path in json.loads(mint(work, "show", "--json", old).stdout)["files"]
    assert quote_path(path) in mint(work, "diff", before, old).stdout
    source = StoreSource(work / ".mint")
    try:
        ours, theirs = source.load(before), source.load(old)
        assert set(ours.tensors) == set(theirs.tensors)
        assert all(ours.tensors[n].equal(theirs.tensors[n]) for n in ours.tensors)
    finally:
        source.close()
    # Checkout never writes it: refused, naming it, nothing changed.
    state = snapshot(work)
    line = mint_fails(work, "checkout", "--force", old)
    assert quote_path(path) in line and "unsafe to write" in line, line
    assert snapshot(work) == state
    # fsck says what is wrong in its own words: no corrupt manifest, no malformed tree.
    result = mint(work, "fsck", ok=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "unsafe to write" in out and quote_path(path) in out, out
    assert "corrupt" not in out and "malformed" not in out, out
    # A HEAD on it (the branch moved there, as that mintvcs's commit left it) can be left.
    branch = git(work / ".mint", "symbolic-ref", "HEAD").stdout.strip()
    for leave in (("checkout", "--force", before), ("reset", "--hard", before)):
        git(work / ".mint", "update-ref", branch, old)
        mint(work, "log", "-n", "1")
        mint(work, *leave)
        assert git(work / ".mint", "rev-parse", "HEAD").stdout.strip() == before
        assert json.loads(mint(work, "status", "--json").stdout)["clean"] is True
        assert not (work / path.split("/")[0]).exists()
