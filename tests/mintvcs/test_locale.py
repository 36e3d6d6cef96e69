"""The console script under a locale that is not UTF-8: the bytes of arguments and file names are
stored and written as git takes them (git 2.39 the oracle)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.mintvcs.storekit import ENV, console_script, git

# The C locale without Python's coercion or UTF-8 mode: an ASCII file-system encoding, where a
# Latin-1 locale would give Latin-1 (this machine and CI have only C, C.UTF-8 and POSIX).
C_LOCALE = {**ENV, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
CAFE = "café".encode()
NAIVE = "naïve".encode()


def _mintvcs_c(cwd: Path, *args: bytes) -> subprocess.CompletedProcess[bytes]:
    """`mintvcs ARGS` by the console script under the C locale; exit 0 and never a traceback."""
    done = subprocess.run(
        [console_script().encode(), *args], cwd=cwd, env=C_LOCALE, capture_output=True, timeout=120
    )
    assert b"Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, (args, done.stderr)
    return done


def _git_bytes(work: Path, *args: str) -> bytes:
    return subprocess.run(
        ["git", "--git-dir", str(work / ".mint"), *args], env=ENV, capture_output=True, check=True
    ).stdout


def test_non_ascii_message_meta_and_name_round_trip_under_the_c_locale(work: Path) -> None:
    # Python decoded argv and file names as ASCII (with surrogate escapes) and encoded them
    # back as UTF-8: the message was refused or stored as other bytes, the name called "not
    # UTF-8", and a checkout of it was a UnicodeEncodeError traceback.
    name = CAFE + b".md"
    with open(os.path.join(os.fsencode(work), name), "wb") as f:
        f.write(b"x\n")
    _mintvcs_c(work, b"commit", b"-m", CAFE, b"--meta", b"k=" + NAIVE, b"--no-verify")
    body = _git_bytes(work, "cat-file", "commit", "HEAD")
    assert body.endswith(b"\n\n" + CAFE + b"\n"), body
    manifest = json.loads(_git_bytes(work, "cat-file", "blob", "HEAD:manifest.json"))
    assert manifest["meta"] == {"k": "naïve"}, manifest["meta"]
    assert "café.md" in [f["path"] for f in manifest["files"]], manifest["files"]
    names = _git_bytes(work, "ls-tree", "-r", "-z", "--name-only", "HEAD").split(b"\0")
    assert b"files/" + name in names, names
    assert git(work / ".mint", "cat-file", "blob", "HEAD:files/café.md").stdout == "x\n"
    status = _mintvcs_c(work, b"status")
    assert b"clean" in status.stdout, status.stdout
    # Checkout writes the name's UTF-8 bytes, as git does whatever the locale.
    os.unlink(os.path.join(os.fsencode(work), name))
    _mintvcs_c(work, b"checkout", b"-f", b"HEAD")
    assert name in os.listdir(os.fsencode(work)), os.listdir(os.fsencode(work))
    shown = _mintvcs_c(work, b"show")
    assert CAFE in shown.stdout and NAIVE in shown.stdout, shown.stdout


def test_python_dash_m_mintvcs_cli_runs_in_utf8_mode_as_the_script_does(work: Path) -> None:
    # Only the console script ran itself again in UTF-8 mode: `python -m mintvcs.cli` (how the
    # demo runs mintvcs, and what it shows where no script is installed) refused a UTF-8
    # message as not UTF-8 under the C locale and called a UTF-8 file name "not UTF-8". Python's
    # own options before -m are read as Python reads them (-W takes a value, -Bm is -B -m).
    name = NAIVE + b".md"
    with open(os.path.join(os.fsencode(work), name), "wb") as f:
        f.write(b"x\n")
    for options in ([b"-m"], [b"-B", b"-W", b"ignore", b"-m"], [b"-Bm"]):
        command = [os.fsencode(sys.executable), *options, b"mintvcs.cli"]
        done = subprocess.run(
            [*command, b"commit", b"-m", CAFE, b"--allow-empty", b"--no-verify"],
            cwd=work,
            env=C_LOCALE,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0 and b"Traceback" not in done.stderr, (options, done.stderr)
        body = _git_bytes(work, "cat-file", "commit", "HEAD")
        assert body.endswith(b"\n\n" + CAFE + b"\n"), (options, body)
    names = _git_bytes(work, "ls-tree", "-r", "-z", "--name-only", "HEAD").split(b"\0")
    assert b"files/" + name in names, names
