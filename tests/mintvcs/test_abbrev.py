"""Short ids printed as git prints them (find_unique_abbrev, core.abbrev, its automatic length),
and names read as git reads them: a full id before a ref of that name, a prefix told apart by
object headers alone. Real `mintvcs` processes, real git."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mintvcs.store import Repository
from tests.mintvcs.storekit import (
    ENV,
    colliding_commits,
    commit_starting_with,
    git,
    handmade_adapter,
    mint,
    random_f32,
)


def _adapter(directory: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tensors = {
        f"base_model.model.model.layers.0.self_attn.q_proj.lora_{ab}.weight": (
            "F32",
            shape,
            random_f32(rng, shape),
        )
        for ab, shape in (("A", [4, 16]), ("B", [16, 4]))
    }
    handmade_adapter(directory, tensors)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A repository with two commits on main."""
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work))
    _adapter(work, 1)
    mint(work, "commit", "-m", "first")
    _adapter(work, 2)
    mint(work, "commit", "-m", "second")
    return work


def _ids(text: str) -> list[str]:
    """The first word of each line: the ids `log --oneline` prints."""
    return [line.split()[0] for line in text.splitlines()]


def _git_oneline(work: Path, *args: str) -> list[str]:
    return _ids(git(work / ".mint", "log", "--oneline", *args).stdout)


def test_ids_sharing_seven_digits_are_printed_as_long_as_git_prints_them(work: Path) -> None:
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    a, b = colliding_commits(git_dir, head, 7)
    git(git_dir, "branch", "c1", a)
    git(git_dir, "branch", "c2", b)
    ours = _ids(mint(work, "log", "--oneline", "--all").stdout)
    assert ours == _git_oneline(work, "--all")
    assert {a[:8], b[:8]} <= set(ours)  # 7 digits would name both
    # `branch` lists them as `git branch -v` does.
    listed = {
        line.split()[-2]: line.split()[-1] for line in mint(work, "branch").stdout.splitlines()
    }
    git_listed = {
        row.lstrip("* ").split()[0]: row.lstrip("* ").split()[1]
        for row in git(git_dir, "branch", "-v").stdout.splitlines()
    }
    assert listed == git_listed
    # What a message prints can be typed back: a deleted branch's id makes a branch again.
    deleted = mint(work, "branch", "-D", "c1").stdout
    short = re.fullmatch(r"Deleted branch c1 \(was (\w+)\)\.\n", deleted)
    assert short is not None and short[1] == a[:8]
    # Detached there, leaving it names the id the advice's `branch` command takes.
    assert mint(work, "checkout", short[1]).stderr.endswith(f"HEAD is now at {a[:8]} (detached)\n")
    left = mint(work, "checkout", "main").stderr
    assert f"  mintvcs branch <new-branch-name> {a[:8]}\n" in left
    mint(work, "branch", "keep", short[1])
    assert git(git_dir, "rev-parse", "keep").stdout.strip() == a


@pytest.mark.parametrize("value", ["12", "no", "false", "", "40", "auto", "4", "010"])
def test_core_abbrev_is_read_as_git_reads_it(work: Path, value: str) -> None:
    git(work / ".mint", "config", "core.abbrev", value)
    assert _ids(mint(work, "log", "--oneline").stdout) == _git_oneline(work)
    git_branch = git(work / ".mint", "branch", "-v").stdout.split()[2]
    assert mint(work, "branch").stdout.split()[2] == git_branch


@pytest.mark.parametrize("value", ["3", "41", "0", "seven", "true"])
def test_a_core_abbrev_git_refuses_is_refused_before_anything_is_written(
    work: Path, value: str
) -> None:
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    git(git_dir, "config", "core.abbrev", value)
    refused = git(git_dir, "log", "--oneline", ok=False)
    assert refused.returncode == 128  # git refuses it too
    _adapter(work, 3)
    result = mint(work, "commit", "-m", "third", ok=False)
    assert result.returncode == 128, result.stderr
    assert result.stderr.startswith(f"error: core.abbrev is {value!r} in your git config")
    git(git_dir, "config", "--unset", "core.abbrev")
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == head


def _fast_import_files(git_dir: Path, count: int) -> None:
    """One commit on main holding `count` small files, each its own blob, into one pack."""
    lines = ["commit refs/heads/main", "committer T <t@example.com> 1700000000 +0000", "data 5"]
    stream = "\n".join(lines) + "\nmany\n"
    stream += "".join(f"M 100644 inline f{i}\ndata {len(str(i))}\n{i}\n" for i in range(count))
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "fast-import", "--quiet"],
        input=stream.encode(),
        env=ENV,
        check=True,
    )


def test_the_automatic_length_follows_the_packed_objects_as_git_s(tmp_path: Path) -> None:
    # git: 7 digits up to 2^14 objects in packs, 8 from there (its approximate object count
    # reads the packs' indexes and leaves loose objects out).
    packed = tmp_path / "packed"
    mint(tmp_path, "init", str(packed))
    _fast_import_files(packed / ".mint", 16400)
    (ours,) = _ids(mint(packed, "log", "--oneline").stdout)
    assert len(ours) == 8 and [ours] == _git_oneline(packed)
    assert Repository.open(packed).abbrev_length() == 8
    # The same objects loose: git's count leaves them out, and prints 7 digits again.
    loose = tmp_path / "loose"
    mint(tmp_path, "init", str(loose))
    (pack,) = (packed / ".mint" / "objects" / "pack").glob("*.pack")
    with pack.open("rb") as source:
        subprocess.run(
            ["git", "--git-dir", str(loose / ".mint"), "unpack-objects", "-q"],
            stdin=source,
            env=ENV,
            check=True,
        )
    git(loose / ".mint", "update-ref", "refs/heads/main", ours)
    (short,) = _ids(mint(loose, "log", "--oneline").stdout)
    assert len(short) == 7 and [short] == _git_oneline(loose)


def test_a_full_id_names_its_commit_before_a_branch_of_that_name(work: Path) -> None:
    git_dir = work / ".mint"
    second = git(git_dir, "rev-parse", "main").stdout.strip()
    first = git(git_dir, "rev-parse", "main~1").stdout.strip()
    mint(work, "branch", second, first)  # git makes such a branch too
    assert git(git_dir, "rev-parse", second).stdout.strip() == second
    shown = mint(work, "show", second)
    assert shown.stdout.startswith(f"commit {second}")
    assert f"warning: refname '{second}' is ambiguous" in shown.stderr
    assert "hint: A ref named by 40 hex digits" in shown.stderr
    logged = mint(work, "log", "--oneline", "-1", f"{second}~1")
    assert _ids(logged.stdout) == [first[:7]]
    # The branch is reached by its full name, and deleted by its name.
    assert _ids(mint(work, "log", "--oneline", "-1", f"refs/heads/{second}").stdout) == [first[:7]]
    assert Repository.open(work).resolve(second) == second
    for off in ("false", "no", "off", "0"):  # git's booleans, not only dulwich's two
        git(git_dir, "config", "advice.objectNameWarning", off)
        quiet = mint(work, "show", second).stderr
        assert "is ambiguous" in quiet and "hint:" not in quiet, off
    mint(work, "branch", "-D", second)
    assert "ambiguous" not in mint(work, "show", second).stderr


def test_checkout_of_a_full_id_that_names_a_branch_switches_to_it_as_git_s(
    work: Path, tmp_path: Path
) -> None:
    # git 2.39's checkout reads refs/heads/NAME before NAME as a revision: it warns that the
    # name is ambiguous, then switches to the branch (every other command reads the object).
    git_dir = work / ".mint"
    second = git(git_dir, "rev-parse", "main").stdout.strip()
    first = git(git_dir, "rev-parse", "main~1").stdout.strip()
    mint(work, "branch", first, second)
    peer = tmp_path / "peer.git"
    shutil.copytree(git_dir, peer)
    (tmp_path / "peer").mkdir()
    theirs = git(peer, "--work-tree", str(tmp_path / "peer"), "checkout", first).stderr
    assert f"warning: refname '{first}' is ambiguous." in theirs
    assert git(peer, "symbolic-ref", "HEAD").stdout.strip() == f"refs/heads/{first}"
    ours = mint(work, "checkout", first).stderr
    assert ours.startswith(
        f"warning: refname '{first}' is ambiguous (refs/heads/{first}); checkout takes the "
        "branch, as git's does"
    )
    assert "hint: Only checkout takes it for the branch" in ours
    assert ours.endswith(f"Switched to branch '{first}'\n")
    assert git(git_dir, "symbolic-ref", "HEAD").stdout.strip() == f"refs/heads/{first}"
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == second
    assert (
        Repository.open(work).read_revision(second).safetensors_bytes()
        == (work / "adapter_model.safetensors").read_bytes()
    )
    # -b starts the new branch there too, as git's.
    git(peer, "--work-tree", str(tmp_path / "peer"), "checkout", "-q", "-b", "new", first)
    assert "is ambiguous" in mint(work, "checkout", "-b", "new", first).stderr
    assert {git(d, "rev-parse", "new").stdout.strip() for d in (peer, git_dir)} == {second}
    # A tag of that name and no branch: checkout detaches at the object, as git's.
    mint(work, "checkout", "main")
    mint(work, "branch", "-D", first)
    mint(work, "tag", first, second)
    detached = mint(work, "checkout", first).stderr
    assert f"40 hex digits name the object {first}" in detached
    assert git(git_dir, "rev-parse", "HEAD").stdout.strip() == first
    assert git(git_dir, "symbolic-ref", "-q", "HEAD", ok=False).returncode == 1


def test_a_ref_named_as_an_abbreviated_id_wins_with_git_s_warning(work: Path) -> None:
    git_dir = work / ".mint"
    second = git(git_dir, "rev-parse", "main").stdout.strip()
    first = git(git_dir, "rev-parse", "main~1").stdout.strip()
    name = second[:6]
    mint(work, "branch", name, first)
    result = mint(work, "log", "--oneline", "-1", name)
    assert _ids(result.stdout) == _git_oneline(work, "-1", name) == [first[:7]]
    assert f"warning: refname '{name}' is ambiguous" in result.stderr
    assert "is ambiguous" in git(git_dir, "log", "-1", name).stderr  # git warns too
    # A name no object's id starts with: nothing to warn of.
    mint(work, "branch", "-m", name, "beef01")
    assert "ambiguous" not in mint(work, "log", "--oneline", "-1", "beef01").stderr


def test_ids_are_abbreviated_again_after_the_repository_is_closed(tmp_path: Path) -> None:
    # close() unmapped the packs abbrev had listed, and abbrev went on searching them: an
    # id printed after a close raised "mmap closed or invalid".
    work = tmp_path / "packed"
    mint(tmp_path, "init", str(work))
    _fast_import_files(work / ".mint", 200)  # past fast-import's unpackLimit: a pack
    assert list((work / ".mint" / "objects" / "pack").glob("*.pack"))
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    repo = Repository.open(work)
    short = repo.abbrev(head)
    repo.close()
    assert repo.abbrev(head) == short == _git_oneline(work)[0]
    repo.close()


@pytest.mark.parametrize("where", ["loose", "packed", "nested"])
def test_ids_sharing_digits_with_an_alternate_s_objects_are_printed_as_git_prints_them(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    # A store borrowing objects through objects/info/alternates (`git clone --shared`) asked
    # dulwich for each id printed, doubling `log --oneline`'s time: the alternates' packs and
    # loose objects are now part of abbrev's own listing, as git's find_unique_abbrev reads them.
    git_dir = work / ".mint"
    head = git(git_dir, "rev-parse", "HEAD").stdout.strip()
    ours, theirs = colliding_commits(git_dir, head, 7)
    git(git_dir, "branch", "c1", ours)
    other = tmp_path / "other.git"
    git(tmp_path, "init", "-q", "--bare", str(other))
    (git_dir / "objects" / "info" / "alternates").write_text(f"# borrowed\n{other / 'objects'}\n")
    holder = other
    if where == "nested":  # named by the alternate's own alternates file, relative to it
        holder = tmp_path / "third.git"
        git(tmp_path, "init", "-q", "--bare", str(holder))
        (other / "objects" / "info" / "alternates").write_text("../../third.git/objects\n")
    loose = Path(theirs[:2], theirs[2:])
    (holder / "objects" / theirs[:2]).mkdir(exist_ok=True)
    (git_dir / "objects" / loose).rename(holder / "objects" / loose)
    if where == "packed":
        subprocess.run(
            [
                "git",
                "--git-dir",
                str(holder),
                "pack-objects",
                "-q",
                str(holder / "objects/pack/pack"),
            ],
            input=f"{theirs}\n",
            text=True,
            env=ENV,
            check=True,
            capture_output=True,
        )
        (holder / "objects" / loose).unlink()
    assert not (git_dir / "objects" / loose).exists()
    shown = _ids(mint(work, "log", "--oneline", "--all").stdout)
    assert shown == _git_oneline(work, "--all")
    assert ours[:8] in shown  # 7 digits would also name the alternate's commit
    # Without asking dulwich id by id.
    asked: list[str] = []
    ask = Repository._ids_with_prefix

    def counting(self: Repository, prefix: str) -> set[str]:
        asked.append(prefix)
        return ask(self, prefix)

    monkeypatch.setattr(Repository, "_ids_with_prefix", counting)
    ids = git(git_dir, "rev-list", "--all").stdout.split()
    with Repository.open(work) as repo:
        assert repo.abbrev_many(ids) == {oid: short for oid, short in zip(ids, shown, strict=True)}
    assert asked == []


def _page_faults() -> int:
    """Minor page faults of this process so far: a large loose object is read through a map,
    so reading it whole faults in its pages (8,192 for 32 MiB), and inflating it its copy's."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_a_prefix_shared_with_a_large_blob_reads_its_header_only(work: Path) -> None:
    # An optimizer state as an extra file is one loose blob of hundreds of MB: telling a
    # commit prefix apart from it must not read it (the server resolves such specs per request).
    repo = Repository.open(work)
    blob = repo.add_blob(np.random.default_rng(0).bytes(32 << 20))
    head = git(work / ".mint", "rev-parse", "HEAD").stdout.strip()
    commit = commit_starting_with(work / ".mint", head, blob[:4])
    repo = Repository.open(work)
    repo.resolve(head[:7])  # what a first resolve sets up, out of the count
    before = _page_faults()
    assert repo.resolve(blob[:4]) == commit
    # Even with 64 KiB fault-around and huge pages, reading the blob would take over 500.
    assert _page_faults() - before < 256


@pytest.mark.parametrize("offsets", [True, False], ids=["ofs-delta", "ref-delta"])
def test_object_types_come_from_headers_through_delta_chains(tmp_path: Path, offsets: bool) -> None:
    work = tmp_path / "work"
    mint(tmp_path, "init", str(work))
    git_dir = work / ".mint"
    # Thirty versions of one text file: git stores most of them as deltas.
    text = "".join(f"line {i}\n" for i in range(400))
    stream = ""
    for version in range(30):
        content = text + f"version {version}\n"
        stream += (
            f"commit refs/heads/main\ncommitter T <t@example.com> {1700000000 + version} +0000\n"
            f"data 2\nv\nM 100644 inline notes.txt\ndata {len(content)}\n{content}\n"
        )
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "fast-import", "--quiet"],
        input=stream.encode(),
        env=ENV,
        check=True,
    )
    flag = "true" if offsets else "false"
    git(git_dir, "-c", f"repack.useDeltaBaseOffset={flag}", "repack", "-adfq", "--depth=50")
    (index,) = (git_dir / "objects" / "pack").glob("*.idx")
    verified = git(git_dir, "verify-pack", "-v", str(index)).stdout
    assert re.search(r"chain length = [2-9]", verified)  # chains of deltas, not whole objects only
    listed = git(
        git_dir, "cat-file", "--batch-all-objects", "--batch-check=%(objectname) %(objecttype)"
    ).stdout.split("\n")
    repo = Repository.open(work)
    kinds = dict(line.split() for line in listed if line)
    assert {oid: repo.object_kind(oid) for oid in kinds} == kinds
