"""`mintvcs demo`: the whole story in under a minute on a laptop CPU, with nothing downloaded.

1. build the embedded tiny Llama once and cache it; 2. train two LoRA adapters with PEFT for a few
seconds, each taught its own answer; 3. commit them to `main` and `product-b`, tag `prod`; 4. start
the server and generate by ref over HTTP; 5. commit a new revision on `main` and watch the next
answer come from it without a restart; 6. `mintvcs log` and `mintvcs diff`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mintvcs.errors import MintError
from mintvcs.serve.model import LORA_MODULES

PROMPTS = (
    "Q: should we ship?\nA:",
    "Q: what is new?\nA:",
    "Q: status?\nA:",
    "Q: which model answers?\nA:",
    "Q: hello\nA:",
    "Q: tell me something\nA:",
)
ASK = "Q: should we ship?\nA:"
PHRASES = {
    "adapter-a": " The answer is yes.",
    "adapter-b": " The answer is no.",
    "adapter-c": " Paris is the capital of France.",
}
TRAIN_STEPS = 80
EOS_ID = 2  # </s> in the tiny tokenizer


class DemoError(MintError):
    """A demo step failed (a CLI command or an HTTP call)."""


@dataclass(frozen=True)
class Answer:
    """One HTTP generate call of the demo."""

    ref: str
    text: str
    revision: str


def cache_root(cache_dir: Path | None = None) -> Path:
    """Where the tiny base lives: --cache-dir, else $XDG_CACHE_HOME/mintvcs/demo, else ~/.cache/mintvcs/demo."""
    # Absolute: the demo runs commands from other directories.
    if cache_dir is not None:
        return Path(cache_dir).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return ((Path(xdg) if xdg else Path.home() / ".cache") / "mintvcs" / "demo").resolve()


def ensure_base(cache_dir: Path) -> tuple[Path, bool]:
    """The cached tiny base, built (atomically: built aside, then renamed) if absent; (path, built now)."""
    from mintvcs.serve.tiny import build_tiny_model

    target = cache_dir / "tiny-llama"
    if (target / "mintvcs-tiny.json").is_file() and (target / "model.safetensors").is_file():
        return target, False
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tiny-llama.", dir=cache_dir))
    except OSError as err:  # a read-only or missing $HOME, say: the option is the way out
        reason = "permission denied" if isinstance(err, PermissionError) else err.strerror
        raise DemoError(
            f"cannot write the tiny base model's cache in {cache_dir} "
            f"({reason or type(err).__name__}): choose a writable directory with --cache-dir "
            "(or $XDG_CACHE_HOME)"
        ) from None
    try:
        build_tiny_model(staging)
    except BaseException as err:
        # A full disk, say: no partial base is left in the cache for every failed run.
        shutil.rmtree(staging, ignore_errors=True)
        if type(err).__name__ == "SafetensorError":  # safetensors' own, not an OSError
            raise DemoError(f"cannot build the tiny base model in {cache_dir}: {err}") from None
        raise
    if target.exists():  # a broken earlier build
        shutil.rmtree(target)
    os.replace(staging, target)
    return target, True


def train_adapter(base: Path, out: Path, phrase: str, steps: int, seed: int = 0) -> float:
    """Teach a LoRA (PEFT, all linears, r=8) to answer every demo prompt with `phrase`; return the final loss."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(LORA_MODULES),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    rows, labels = [], []
    answer = [*tokenizer.encode(phrase).ids, EOS_ID]
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        rows.append(ids + answer)
        labels.append([-100] * len(ids) + answer)  # learn the answer, not the question
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [EOS_ID] * (width - len(r)) for r in rows])
    target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    loss = 0.0
    for _ in range(steps):
        step_loss = peft_model(input_ids=input_ids, attention_mask=mask, labels=target).loss
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
        loss = step_loss.item()
    peft_model.save_pretrained(str(out))
    return loss


def _command() -> str:
    """How the user can run mintvcs: `mintvcs` when it is on PATH, else this venv's script (after `make demo`)."""
    script = Path(sys.executable).parent / "mintvcs"
    found = shutil.which("mintvcs")
    if found and Path(found).resolve() == script.resolve():
        return "mintvcs"
    return str(script) if script.exists() else f"{sys.executable} -m mintvcs.cli"


def _cli(repo: Path, *args: str) -> str:
    """Run `mintvcs ARGS` in the repository, as a user would; what a terminal shows of it (stdout,
    then stderr, where checkout says what it switched to)."""
    # Your identity if you have one; else an email for the demo's commits, where git (and so
    # mintvcs) would refuse one made up from a host name without a domain (a container's).
    env = dict(os.environ)
    if not env.get("EMAIL", "").strip():
        env["EMAIL"] = "mintvcs-demo@localhost"
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise DemoError(
            f"mintvcs {' '.join(args)} failed: {(result.stderr or result.stdout).strip()}"
        )
    return result.stdout + result.stderr


def _copy_adapter(source: Path, repo: Path) -> None:
    """Put a PEFT adapter's files in the work tree, as a training job writing its output there would."""
    for path in source.iterdir():
        if path.is_file():
            shutil.copyfile(path, repo / path.name)


def _show(echo: Any, args: tuple[str, ...], out: str, root: Path) -> None:
    shown = " ".join(a if " " not in a else repr(a) for a in args).replace(str(root) + "/", "")
    echo(f"      $ mintvcs {shown}")
    first = out.strip().splitlines()[0] if out.strip() else ""
    if first:
        echo(f"        {first}")


def _generate(url: str, ref: str) -> Answer:
    data = _post_generate(url, ref)
    return Answer(ref, data["text"], data["revision"])


def _post_generate(url: str, ref: str) -> dict[str, Any]:
    body = json.dumps({"prompt": ASK, "ref": ref, "max_tokens": 16, "temperature": 0}).encode()
    request = urllib.request.Request(
        url + "/generate", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            data: dict[str, Any] = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise DemoError(
            f"generate ref={ref} answered {err.code}: {err.read().decode(errors='replace')}"
        ) from None
    return data


# In a --workdir the demo made: the next run may replace its adapters/ and repo/.
DEMO_MARK = ".mintvcs-demo"


def run_demo(
    *,
    workdir: Path | None = None,
    cache_dir: Path | None = None,
    train_steps: int | None = None,
    echo: Any = click.echo,
) -> dict[str, Any]:
    """Run the six steps, printing as it goes; return what was served (for tests)."""
    started = time.perf_counter()
    steps = train_steps or TRAIN_STEPS
    # Absolute: the steps run `mintvcs` from the repository, and init from here.
    root = (
        Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="mintvcs-demo-"))
    ).resolve()
    if root.is_dir() and any(root.iterdir()) and not (root / DEMO_MARK).exists():
        raise DemoError(
            f"--workdir {root} is not empty and was not made by the demo, which writes "
            "adapters/ and repo/ there, replacing what they hold; give a new or empty directory"
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_MARK).touch()  # a later run may replace what this one writes here
    bold = lambda text: click.style(text, bold=True)  # noqa: E731
    echo(bold("mintvcs demo: one resident base model, adapters as git revisions, served by ref"))

    # 1. the base
    t = time.perf_counter()
    base, built = ensure_base(cache_root(cache_dir))
    echo(
        f"\n{bold('[1/6]')} tiny Llama base {'built' if built else 'reused'} at {base} ({time.perf_counter() - t:.1f} s)"
    )

    # 2. two adapters
    import torch

    threads = torch.get_num_threads()
    # A 0.2M-parameter model gains nothing from threads; on a busy 2-core box they only contend.
    torch.set_num_threads(1)
    adapters = root / "adapters"
    echo(f"\n{bold('[2/6]')} training two LoRA adapters with PEFT ({steps} steps each)")
    for name in ("adapter-a", "adapter-b"):
        t = time.perf_counter()
        loss = train_adapter(base, adapters / name, PHRASES[name], steps)
        echo(
            f"      {name} learns {PHRASES[name]!r}  (loss {loss:.3f}, {time.perf_counter() - t:.1f} s)"
        )

    # 3. commits, branch, tag
    repo = root / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    echo(f"\n{bold('[3/6]')} committing in {repo}")
    script: list[tuple[str, ...]] = [
        ("init", str(repo), "--base-model", str(base)),
        ("cp", "adapter-a"),
        ("commit", "-m", "adapter-a: answers yes"),
        ("tag", "prod", "main", "-m", "release 1"),
        ("checkout", "-b", "product-b", "main"),
        ("cp", "adapter-b"),
        ("commit", "-m", "adapter-b: answers no"),
        ("checkout", "main"),
    ]
    for args in script:
        if args[0] == "cp":
            _copy_adapter(adapters / args[1], repo)
            echo(f"      $ cp adapters/{args[1]}/* repo/")
            continue
        out = _cli(repo if args[0] != "init" else root, *args)
        _show(echo, args, out, root)

    # 4. serve and ask
    from mintvcs.serve.app import BackgroundServer, ServerConfig

    config = ServerConfig(
        repo=repo, base_model=base, port=0, max_model_len=256, max_loras=4, max_rank=16
    )
    answers: list[Answer] = []
    with BackgroundServer(config) as server:
        echo(
            f"\n{bold('[4/6]')} serving on {server.url} (the base stays resident; revisions load into slots)"
        )
        for ref in ("main", "product-b", "prod"):
            answer = _generate(server.url, ref)
            answers.append(answer)
            echo(
                f"      POST /generate ref={ref:<10} -> {answer.text!r:<36} revision {answer.revision[:12]}"
            )
        # What the adapters changed: the base alone, asked by its served name.
        base_answer = str(_post_generate(server.url, config.base_name)["text"])
        echo(
            f"      POST /generate ref={config.base_name:<10} -> {base_answer!r:<36} "
            "the base alone (random weights: its bytes need not even be text)"
        )

        # 5. a new revision on main, no restart
        echo(f"\n{bold('[5/6]')} a new revision lands on main while the server runs")
        t = time.perf_counter()
        loss = train_adapter(base, adapters / "adapter-c", PHRASES["adapter-c"], steps, seed=1)
        echo(
            f"      adapter-c learns {PHRASES['adapter-c']!r}  (loss {loss:.3f}, {time.perf_counter() - t:.1f} s)"
        )
        _copy_adapter(adapters / "adapter-c", repo)
        echo("      $ cp adapters/adapter-c/* repo/")
        args = ("commit", "-m", "adapter-c: answers Paris")
        out = _cli(repo, *args)
        committed = time.perf_counter()
        _show(echo, args, out, root)
        swapped = _generate(server.url, "main")
        swap_ms = (time.perf_counter() - committed) * 1000
        answers.append(swapped)
        echo(
            f"      POST /generate ref={'main':<10} -> {swapped.text!r:<36} revision {swapped.revision[:12]}"
            f"  ({swap_ms:.0f} ms after the commit, no restart)"
        )
        still = _generate(server.url, "prod")
        answers.append(still)
        echo(
            f"      POST /generate ref={'prod':<10} -> {still.text!r:<36} revision {still.revision[:12]}  (tags stay put)"
        )
    torch.set_num_threads(threads)

    # 6. history
    echo(f"\n{bold('[6/6]')} history")
    echo("      $ mintvcs log --oneline")
    for line in _cli(repo, "log", "--oneline").strip().splitlines():
        echo(f"        {line}")
    echo(f"      $ mintvcs diff {answers[0].revision[:7]} {swapped.revision[:7]}")
    lines = _cli(repo, "diff", answers[0].revision, swapped.revision).strip().splitlines()
    for line in lines[:8]:
        echo(f"        {line}")
    if len(lines) > 8:
        echo(f"        ... {len(lines) - 8} more lines")
    total = time.perf_counter() - started
    mintvcs = _command()
    echo(f"\ndone in {total:.1f} s. The repository is in {repo}; try `cd {repo} && {mintvcs} log`,")
    echo(f"or serve it yourself: {mintvcs} serve --repo {repo} --base-model {base}")
    ask = json.dumps({"prompt": ASK, "ref": "product-b", "max_tokens": 16, "temperature": 0})
    echo(f"and ask as the demo did: curl -s localhost:8000/generate -d '{ask}'")
    return {
        "answers": answers,
        "base_answer": base_answer,
        "swap_ms": swap_ms,
        "seconds": total,
        "repo": repo,
        "base": base,
    }
