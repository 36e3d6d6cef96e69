"""History walks benchmark: log, ranges and `~N` over a long chain of commits, beside git.

The store: one mintvcs commit on main (a small adapter), then a branch `deep` of N commits on
it (written by `git fast-import`, each a minute after the last, all after main's), packed by
`mintvcs gc`. Each command runs as its own process, `--repeat` times; printed: the least CPU
seconds (user + sys) it took, and git's for the same command. The output of log and
`log --oneline` is checked byte for byte against git's (`--decorate=short`, as ours prints).

    python bench/walks.py                   # 50,000 commits on main's one
    python bench/walks.py --commits 5000 --repeat 1
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.mintvcs.storekit import handmade_adapter  # noqa: E402

GIT_ENV = {
    **os.environ,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    **{
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "bench"), ("EMAIL", "bench@localhost"))
    },
}
MINT = [sys.executable, "-c", "import sys; from mintvcs.console import main; sys.exit(main())"]
COMMANDS = [
    ["log", "--oneline", "deep"],
    ["log", "--oneline", "deep..main"],
    ["log", "--oneline", "main..deep"],
    ["show", "deep~{back}"],
    ["log", "-n1", "--oneline", "deep~{last}"],
    ["log", "deep"],
]


def build(work: Path, commits: int) -> None:
    """The store described in the module's docstring."""
    env = {**GIT_ENV, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [*MINT, "init", str(work), "--base-model", "bench/base"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    tensors: dict[str, tuple[str, list[int], bytes]] = {}
    for ab, shape in (("A", [4, 16]), ("B", [16, 4])):
        name = f"base_model.model.layers.0.self_attn.q_proj.lora_{ab}.weight"
        tensors[name] = ("F32", shape, bytes(4 * shape[0] * shape[1]))
    handmade_adapter(work, tensors)
    subprocess.run(
        [*MINT, "commit", "-m", "base", "--no-verify"],
        cwd=work,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    start = int(time.time()) + 60
    stream = []
    for mark in range(1, commits + 1):
        stamp = f"Trainer <trainer@example.com> {start + 60 * mark} +0000"
        message = f"step {mark}: loss {1 / mark:.6f}\n\nlr 1e-4\n"
        parent = f"from :{mark - 1}" if mark > 1 else "from refs/heads/main"
        stream.append(
            f"commit refs/heads/deep\nmark :{mark}\nauthor {stamp}\ncommitter {stamp}\n"
            f"data {len(message)}\n{message}{parent}\n"
        )
    subprocess.run(
        ["git", "--git-dir", str(work / ".mint"), "fast-import", "--quiet"],
        input="".join(stream).encode(),
        env=GIT_ENV,
        check=True,
    )
    subprocess.run([*MINT, "gc"], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)


def cpu_of(command: list[str], cwd: Path) -> tuple[float, bytes]:
    """CPU seconds (user + sys) of running `command`, and its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command, cwd=cwd, env={**GIT_ENV, "PYTHONPATH": str(ROOT)}, capture_output=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"{command} failed: {done.stderr.decode(errors='replace')}")
    spent = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return spent, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "work"
        build(work, args.commits)
        git = ["git", "--git-dir", str(work / ".mint")]
        back, last = args.commits * 9 // 10, args.commits - 1
        for command in COMMANDS:
            command = [part.format(back=back, last=last) for part in command]
            ours = [cpu_of([*MINT, *command], work) for _ in range(args.repeat)]
            peer = [*command[:1], "--decorate=short", *command[1:]]
            theirs = [cpu_of([*git, *peer], work) for _ in range(args.repeat)]
            if command[0] == "log" and ours[0][1] != theirs[0][1]:
                raise SystemExit(f"mintvcs {' '.join(command)}: output differs from git's")
            ratio = min(t for t, _ in ours) / max(min(t for t, _ in theirs), 1e-3)
            print(
                f"{' '.join(command)}: ours {min(t for t, _ in ours):.2f} s, "
                f"git {min(t for t, _ in theirs):.2f} s, ratio {ratio:.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
