"""`mintvcs demo` end to end, as a process: the six steps, the answers by ref, the swap without restart."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mintvcs.serve.demo import PHRASES, cache_root, ensure_base
from tests.mintvcs.storekit import ENV, console_script


def test_base_is_built_once_then_reused(tmp_path: Path) -> None:
    base, built = ensure_base(tmp_path)
    assert built and (base / "config.json").is_file()
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    again, built_again = ensure_base(tmp_path)
    assert again == base and not built_again
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tiny-llama.")]


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "mintvcs" / "demo"
    assert cache_root(tmp_path / "x") == tmp_path / "x"


@pytest.mark.slow
def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mintvcs.serve.cli",
            "demo",
            # Relative, as a user types them: the demo runs commands from other directories.
            "--workdir",
            "work",
            "--cache-dir",
            "cache",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_COLOR": "1"},
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for step in range(1, 7):
        assert f"[{step}/6]" in out
    served = re.findall(r"ref=(\S+)\s+-> '([^']*)'\s+revision ([0-9a-f]{12})", out)
    by_ref = [(ref, text) for ref, text, _ in served]
    assert by_ref == [
        ("main", PHRASES["adapter-a"]),
        ("product-b", PHRASES["adapter-b"]),
        ("prod", PHRASES["adapter-a"]),
        ("main", PHRASES["adapter-c"]),
        ("prod", PHRASES["adapter-a"]),
    ]
    revisions = [rev for _, _, rev in served]
    assert revisions[0] == revisions[2] == revisions[4] != revisions[3] and revisions[1] not in (
        revisions[0],
        revisions[3],
    )
    base = re.search(r"ref=tiny-llama -> (.+) the base alone \(random weights", out)
    assert base is not None and not any(p in base.group(1) for p in PHRASES.values())
    assert "no restart" in out and "mintvcs log --oneline" in out and "mintvcs diff" in out
    assert revisions[3][:7] in out.split("[6/6]")[1]  # the log shows the new revision
    assert elapsed < 120, f"the demo took {elapsed:.0f} s"


def test_the_demo_refuses_a_workdir_it_did_not_make_and_a_step_count_under_one(
    tmp_path: Path,
) -> None:
    mine = tmp_path / "mine"
    (mine / "repo").mkdir(parents=True)
    (mine / "repo" / "important.txt").write_text("keep me\n")

    def demo(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mintvcs.serve.cli", "demo", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    refused = demo("--workdir", str(mine), "--cache-dir", str(tmp_path / "cache"))
    # It used to delete DIR/repo without a word.
    assert refused.returncode == 1 and "not made by the demo" in refused.stderr
    assert (mine / "repo" / "important.txt").read_text() == "keep me\n"
    for steps in ("0", "-3"):  # 0 used to mean the default, -3 failed later on
        result = demo("--train-steps", steps)
        assert result.returncode == 2 and "--train-steps" in result.stderr


def test_a_base_that_cannot_be_written_leaves_no_partial_build_and_one_line(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"

    def cap() -> None:  # a full cache disk, as far as the writer sees: 100 KB per file
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    args = ["--workdir", str(tmp_path / "w"), "--cache-dir", str(cache), "--train-steps", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.serve.cli", "demo", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=cap,
    )
    # safetensors' SafetensorError was a traceback; each failed run left a .tiny-llama.* behind.
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"error: cannot build the tiny base model in {cache}: "), last
    assert list(cache.iterdir()) == []


def test_a_home_it_cannot_write_in_is_one_line_that_names_cache_dir(tmp_path: Path) -> None:
    # A HOME the cache cannot go under (a file here: root may write in a read-only directory):
    # the error was the bare "Not a directory: ...", without the option that avoids it.
    home = tmp_path / "home"
    home.write_text("")
    env = {k: v for k, v in ENV.items() if k != "XDG_CACHE_HOME"}
    result = subprocess.run(
        [console_script(), "demo", "--workdir", str(tmp_path / "w")],
        cwd=tmp_path,
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith(f"error: cannot write the tiny base model's cache in {home}/"), last
    assert "--cache-dir" in last, last


def test_mintvcs_dash_c_takes_the_workdir_from_its_directory(tmp_path: Path) -> None:
    # Both w's hold a file the demo did not make: the refusal names the one it took.
    for where in (tmp_path, tmp_path / "d"):
        (where / "w").mkdir(parents=True)
        (where / "w" / "mine.txt").write_text("keep me\n")
    refused = subprocess.run(
        [console_script(), "-C", "d", "demo", "--workdir", "w", "--cache-dir", "cache"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith(f"error: --workdir {tmp_path / 'd' / 'w'} is not empty")


# A finder that makes `import peft` fail as it does where only the base package is installed.
_WITHOUT_PEFT = """
import sys


class NoPeft:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "peft":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoPeft())
from mintvcs.cli import main

sys.argv = ["mintvcs", "demo", "--workdir", sys.argv[1]]
main()
"""


def test_the_demo_without_peft_says_which_extra_to_install(tmp_path: Path) -> None:
    # peft and transformers are the `demo` extra: without them the demo was a traceback after step 1.
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_PEFT, str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "error: mintvcs demo trains its adapters with PEFT, and peft is not installed: "
        "pip install 'mintvcs[demo]'"
    )
    assert not (tmp_path / "demo").exists()
