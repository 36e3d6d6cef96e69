"""Repository hooks in `.mint/hooks/`, run as git runs its own."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from mintvcs.errors import MintError

# Samples shipped in the `hooks/` directory of the source tree (package `mintvcs.hook_samples`).
SAMPLES = ("pre-commit", "commit-msg", "post-commit", "ref-update")
INSTALLED_BY_INIT = ("pre-commit",)


class HookRefusedError(MintError):
    """A pre-commit or commit-msg hook exited non-zero."""


def hook_env(git_dir: Path, adapter_dir: Path | None = None) -> dict[str, str]:
    """The environment hooks get: where the repository and adapter are, and which Python runs mintvcs."""
    env = dict(os.environ)
    env["MINT_DIR"] = str(git_dir)
    env["MINT_PYTHON"] = sys.executable
    if adapter_dir is not None:
        env["MINT_ADAPTER_DIR"] = str(adapter_dir)
    return env


def run_hook(
    git_dir: Path, name: str, args: list[str], env: dict[str, str], *, may_refuse: bool
) -> None:
    """Run `.mint/hooks/NAME` if it exists and is executable; a refusal raises when the hook may refuse."""
    path = git_dir / "hooks" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        return
    result = subprocess.run(
        [str(path), *args], env=env, cwd=git_dir.parent, capture_output=True, text=True, check=False
    )
    output = (result.stderr or result.stdout).strip()
    if result.returncode != 0 and may_refuse:
        detail = output.splitlines()[-1] if output else f"exit status {result.returncode}"
        raise HookRefusedError(
            f"{name} hook refused the commit: {detail} (use --no-verify to skip hooks)"
        )
    if output:
        sys.stderr.write(output + "\n")


def install_samples(git_dir: Path) -> None:
    """Copy the sample hooks into `.mint/hooks/`: the validating pre-commit active, the rest as .sample."""
    target = git_dir / "hooks"
    target.mkdir(exist_ok=True)
    samples = resources.files("mintvcs.hook_samples")
    for name in SAMPLES:
        source = samples / name
        if not source.is_file():
            continue
        dest = target / (name if name in INSTALLED_BY_INIT else f"{name}.sample")
        with resources.as_file(source) as src:
            shutil.copyfile(src, dest)
        dest.chmod(0o755)
