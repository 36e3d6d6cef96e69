"""Store benchmark: adapter bytes on disk and commit/checkout wall time, each against a peer.

Everything is built locally in a temporary directory; nothing is downloaded.

1. chain:  50 bf16 revisions of a PEFT LoRA (r=16, all linear) on a tiny Llama,
   trained with Adam at lr 1e-5 and saved every step. Store size against raw
   safetensors (what git-lfs keeps), zstd-3 per file and plain git + `git gc`.
2. single: one revision (the chain's last), bf16 and its fp32 master, against
   the raw file and zstd-3 of the file.
3. big:    an 84 MB bf16 adapter with Llama-3-8B shapes: `mintvcs commit` and
   `mintvcs checkout` (CLI processes, wall time) against `git add && git commit`
   (the issue's peer for both) and `git checkout` of the same file, plus where our
   time goes in-process. mintvcs is byte-compiled first, as an installed package is.
4. swap:   decoding a 33.5 MB fp32 revision from the store with
   `read_revision(c).tensors()`, as the server's hot swap does (goal <= 80 ms).
5. extra:  a trainer's checkpoint directory, a small adapter beside a 256 MB fp32
   optimizer state: `mintvcs commit` and a clean `mintvcs status` against
   `git add -A && git commit` and `git status`.
6. meta:   an MoE-shaped adapter of 37,248 tiny tensors, 10 revisions with 1% of
   them changed each: the store after `mintvcs gc` (manifests and trees as deltas)
   against gc without deltas and `git repack -adf`, gc's time, and read_revision /
   checkout of the newest and the deepest revision.

Each line reads `name: ours X, peer Y, ratio Z`, ratio = peer / ours, so above
1 means we are smaller or faster. The refs benchmark is bench/refs.py.

    python bench/store.py            # full run (a few minutes on 2 cores)
    python bench/store.py --quick    # a smoke run: every section at its least, one trial
    python bench/store.py --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import zstandard

from mintvcs import codec, maintenance, porcelain
from mintvcs.adapter import read_adapter
from mintvcs.store import Repository

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost"}
# Same identity and no user or system config for both tools, so that neither
# picks up settings (compression, hooks) from the machine.
ENV = {
    **os.environ,
    **IDENTITY,
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@localhost",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
}
LLAMA3_8B = {  # per layer: projection -> (in, out)
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (4096, 1024),
    "self_attn.v_proj": (4096, 1024),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (4096, 14336),
    "mlp.up_proj": (4096, 14336),
    "mlp.down_proj": (14336, 4096),
}


def _mintvcs_cmd() -> list[str]:
    """The installed CLI next to this interpreter."""
    script = Path(sys.executable).with_name("mintvcs")
    if not script.exists():
        raise SystemExit(f"{script} not found: install the project (`make setup`)")
    return [str(script)]


MINTVCS = _mintvcs_cmd()


# ------------------------------------------------------------------ results
@dataclass
class Result:
    """One measured comparison."""

    name: str
    ours: float
    peer: float
    unit: str  # "B" or "s"
    peer_name: str
    goal: str = ""
    met: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """peer / ours: above 1 is better for us."""
        return self.peer / self.ours if self.ours else float("inf")


RESULTS: list[Result] = []
NOTES: dict[str, Any] = {}


def fmt(value: float, unit: str) -> str:
    """A size or a duration, readable."""
    if unit == "B":
        if value >= 1e6:
            return f"{value / 1e6:.2f} MB"
        return f"{value / 1e3:.1f} kB"
    if value < 1:
        return f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s"


def report(result: Result) -> None:
    """Record a result and print its line."""
    RESULTS.append(result)
    goal = f"  [goal {result.goal}: {'met' if result.met else 'NOT met'}]" if result.goal else ""
    print(
        f"{result.name}: ours {fmt(result.ours, result.unit)}, "
        f"peer {fmt(result.peer, result.unit)} ({result.peer_name}), "
        f"ratio {result.ratio:.2f}x{goal}",
        flush=True,
    )


def note(text: str) -> None:
    """A context line that is not a comparison."""
    print(f"# {text}", flush=True)


def tree_bytes(path: Path) -> int:
    """Total size of the regular files under `path`."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def zstd3(data: bytes) -> int:
    """Size of `data` compressed by zstd at level 3 (its default)."""
    return len(zstandard.ZstdCompressor(level=3).compress(data))


CPU: dict[str, list[float]] = {}  # label -> CPU seconds (user + sys) of timed child processes


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], cwd: Path, cpu_label: str | None = None) -> float:
    """Run a command to completion; returns its wall time (and records its CPU time), failing loudly."""
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if cpu_label:
        # CPU time barely depends on other processes' load, unlike wall time.
        CPU.setdefault(cpu_label, []).append(_children_cpu() - c0)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout}{proc.stderr}")
    return elapsed


def git(cwd: Path, *args: str, cpu_label: str | None = None) -> float:
    """Run git in `cwd`."""
    return run(["git", *args], cwd, cpu_label)


def sh(cwd: Path, script: str, cpu_label: str | None = None) -> float:
    """Run a shell line (for `git add && git commit`, timed as one)."""
    return run(["sh", "-c", script], cwd, cpu_label)


def copy_adapter(src: Path, dst: Path) -> None:
    """Put a PEFT adapter dir's files into `dst` (a work tree)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(src / name, dst / name)


# --------------------------------------------------------- 1. the RL chain
# The tiny Llama the chain trains on; --quick's is one narrow layer (the size goals are for this one).
CHAIN_BASE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
QUICK_CHAIN_BASE = {
    **CHAIN_BASE,
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 1,
}


def train_chain(tmp: Path, steps: int, base: dict[str, int] = CHAIN_BASE) -> list[Path]:
    """Train a LoRA on a tiny Llama, saving a bf16 adapter (and the last fp32 master) every step."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.fixtures import build_base

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    base_dir = build_base(tmp / "base", seed=0, **base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=list(ALL_LINEAR),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.Adam(params, lr=1e-5)
    gen = torch.Generator().manual_seed(1)
    vocab = int(model.config.vocab_size)
    batches = [torch.randint(3, vocab, (4, 64), generator=gen) for _ in range(4)]
    out: list[Path] = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        ids = batches[step % len(batches)]
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        # A trainer keeps fp32 masters and publishes bf16 adapters.
        lora = {
            k: v.detach().to(torch.bfloat16)
            for k, v in peft_model.state_dict().items()
            if "lora_" in k
        }
        target = tmp / "revs" / f"step{step:03d}"
        peft_model.save_pretrained(str(target), state_dict=lora)
        out.append(target)
    peft_model.save_pretrained(str(tmp / "revs" / "last-fp32"))
    note(
        f"chain: trained and saved {steps} steps in {time.perf_counter() - t0:.1f} s (final loss {loss.item():.4f})"
    )
    return out


def bench_chain(tmp: Path, revs: list[Path]) -> None:
    """Store size of the chain: ours vs raw, zstd-3 per file and plain git."""
    n = len(revs)
    files = [r / "adapter_model.safetensors" for r in revs]
    raw = sum(f.stat().st_size for f in files)
    z3 = sum(zstd3(f.read_bytes()) for f in files)

    work = tmp / "chain-mint"
    repo = porcelain.init(work, install_hooks=False)
    t0 = time.perf_counter()
    for i, rev in enumerate(revs, 1):
        porcelain.commit(
            repo, f"step {i}", source=rev, meta={"step": str(i)}, verify=False, show_progress=False
        )
    t_ours = time.perf_counter() - t0
    repo.close()
    before = tree_bytes(work / ".mint")
    gc_time = run([*MINTVCS, "gc"], work)
    after = tree_bytes(work / ".mint")
    after_objects = tree_bytes(work / ".mint" / "objects")

    gwork = tmp / "chain-git"
    git(tmp, "init", "-q", "-b", "main", str(gwork))
    t0 = time.perf_counter()
    for i, rev in enumerate(revs, 1):
        copy_adapter(rev, gwork)
        sh(gwork, f"git add -A && git commit -q -m 'step {i}'")
    t_git = time.perf_counter() - t0
    git_loose = tree_bytes(gwork / ".git" / "objects")
    git(gwork, "gc", "-q")
    git_packed = tree_bytes(gwork / ".git" / "objects")

    composition = _composition(work)
    note(
        f"chain: {n} revisions, {raw / n / 1e3:.0f} kB each; ours committed in {t_ours:.1f} s in-process, "
        f"git add+commit {t_git:.1f} s; `mintvcs gc` {gc_time:.2f} s"
    )
    note(
        f"chain: .mint before gc {fmt(before, 'B')}, after {fmt(after, 'B')} (objects {fmt(after_objects, 'B')}); "
        f"git objects loose {fmt(git_loose, 'B')}, after gc {fmt(git_packed, 'B')}"
    )
    NOTES["chain"] = {
        "revisions": n, "raw": raw, "zstd3": z3, "mint_before_gc": before, "mint_after_gc": after,
        "mint_objects_after_gc": after_objects, "git_loose": git_loose, "git_after_gc": git_packed,
        "composition": composition,
    }  # fmt: skip
    name = f"chain {n} bf16 revs, bytes"
    note(
        "chain: unique object bytes by kind: "
        + ", ".join(f"{k} {v:,}" for k, v in composition.items())
    )
    report(
        Result(
            f"{name} (.mint after gc) vs raw safetensors",
            after,
            raw,
            "B",
            "raw, as git-lfs stores",
            ">= 2.5x",
            raw / after >= 2.5,
        )
    )
    report(
        Result(
            f"{name} (.mint before gc) vs raw safetensors",
            before,
            raw,
            "B",
            "raw, as git-lfs stores",
            ">= 2.5x",
            raw / before >= 2.5,
        )
    )
    report(
        Result(f"{name} (.mint after gc) vs zstd-3 per file", after, z3, "B", "zstd -3 each file")
    )
    report(
        Result(
            f"{name} (.mint after gc) vs plain git after gc",
            after,
            git_packed,
            "B",
            "git add/commit + git gc, .git/objects",
        )
    )


def _composition(work: Path) -> dict[str, int]:
    """Unique object bytes (uncompressed content) by kind over the whole history, and blob counts."""
    from dulwich.objects import Tree

    repo = Repository.open(work)
    seen: set[str] = set()
    out: dict[str, int] = {}

    def add(kind: str, oid: str) -> None:
        if oid in seen:
            return
        seen.add(oid)
        _type, data = repo.objects.get_raw(cast(Any, oid.encode()))
        out[kind] = out.get(kind, 0) + len(data)
        out[f"{kind} (count)"] = out.get(f"{kind} (count)", 0) + 1

    try:
        head = repo.head_commit()
        assert head is not None
        for info in repo.walk(head):
            add("commits", info.id)
            rev = repo.read_revision(info.id)
            stack = [info.tree]
            while stack:  # every tree object of the revision
                tree_id = stack.pop()
                add("trees", tree_id)
                tree = repo.get_object(tree_id)
                assert isinstance(tree, Tree)
                stack += [e.sha.decode() for e in tree.items() if e.mode == 0o040000]
                if tree_id == info.tree:
                    add("manifests", tree[b"manifest.json"][1].decode())
            for record in rev.manifest.tensors:
                add(f"tensor blobs, {record.encoding}", record.blob)
        return out
    finally:
        repo.close()


# ------------------------------------------------------- 2. single revision
def bench_single(tmp: Path, label: str, adapter_dir: Path, goal: float | None = None) -> None:
    """One revision in a fresh store (after gc) against the raw file and zstd-3 of it."""
    data = (adapter_dir / "adapter_model.safetensors").read_bytes()
    adapter = read_adapter(adapter_dir)
    tensor_raw = sum(e.nbytes for e in adapter.layout.tensors)
    tensor_ours = sum(
        len(codec.encode(adapter.tensor_bytes(i), e.dtype, e.shape))
        for i, e in enumerate(adapter.layout.tensors)
    )
    tensor_z3 = sum(
        zstd3(bytes(adapter.tensor_bytes(i))) for i in range(len(adapter.layout.tensors))
    )
    work = tmp / f"single-{label}"
    repo = porcelain.init(work, install_hooks=False)
    porcelain.commit(repo, "one", source=adapter_dir, verify=False, show_progress=False)
    maintenance.gc(repo)
    repo.close()
    store = tree_bytes(work / ".mint" / "objects")
    name = f"single {label} ({len(data) / 1e6:.2f} MB)"
    report(
        Result(
            f"{name}, store objects vs raw file",
            store,
            len(data),
            "B",
            "raw file",
            f">= {goal}x" if goal else "",
            (len(data) / store >= goal) if goal else None,
        )
    )
    report(
        Result(
            f"{name}, store objects vs zstd-3 of the file",
            store,
            zstd3(data),
            "B",
            "zstd -3 of the file",
        )
    )
    report(
        Result(
            f"{name}, tensor codec only vs raw tensor bytes",
            tensor_ours,
            tensor_raw,
            "B",
            "raw tensor bytes",
        )
    )
    report(
        Result(
            f"{name}, tensor codec only vs zstd-3 per tensor",
            tensor_ours,
            tensor_z3,
            "B",
            "zstd -3 per tensor",
        )
    )


# ------------------------------------------------ 3. Llama-3-8B-shaped adapter
class BigAdapter:
    """An r=16 all-linear LoRA with Llama-3-8B shapes; each next() takes one Adam-like step at lr 1e-5."""

    def __init__(self, layers: int, rank: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.master: dict[str, np.ndarray] = {}
        for i in range(layers):
            for proj, (fan_in, fan_out) in LLAMA3_8B.items():
                prefix = f"base_model.model.model.layers.{i}.{proj}"
                # PEFT's kaiming_uniform_(a=sqrt(5)) bound is 1/sqrt(fan_in).
                bound = 1.0 / np.sqrt(fan_in)
                self.master[f"{prefix}.lora_A.weight"] = rng.uniform(
                    -bound, bound, (rank, fan_in)
                ).astype(np.float32)
                self.master[f"{prefix}.lora_B.weight"] = (
                    rng.standard_normal((fan_out, rank), dtype=np.float32) * 2e-3
                )
        self.rank = rank

    def step(self) -> None:
        """One update of size lr in a random direction per element (what Adam's step looks like)."""
        for value in self.master.values():
            value += np.where(
                self.rng.random(value.shape, dtype=np.float32) < 0.5, -1e-5, 1e-5
            ).astype(np.float32)

    def save(self, directory: Path) -> Path:
        """Write adapter_config.json and a bf16 adapter_model.safetensors as PEFT names them."""
        import torch
        from peft import LoraConfig
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in self.master.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = LoraConfig(
            r=self.rank, lora_alpha=32, target_modules=list(ALL_LINEAR), lora_dropout=0.0,
            task_type="CAUSAL_LM", base_model_name_or_path="meta-llama/Meta-Llama-3-8B",
        )  # fmt: skip
        config.save_pretrained(str(directory))
        return directory


def _compile_bytecode() -> None:
    """Byte-compile mintvcs, as installing the package does, so CLI timings don't include compiling.

    An editable checkout run with PYTHONDONTWRITEBYTECODE=1 (as this machine's shells are)
    recompiles every mintvcs module in every process (~60 ms); an installed wheel ships .pyc.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(root / "mintvcs")],
        env=env,
        check=True,
        capture_output=True,
    )


HOT_SWAP = {  # hidden 1024, intermediate 2816, 16 heads / 8 KV heads of 64: bench/engine.py's model
    "self_attn.q_proj": (1024, 1024), "self_attn.k_proj": (1024, 512), "self_attn.v_proj": (1024, 512),
    "self_attn.o_proj": (1024, 1024), "mlp.gate_proj": (1024, 2816), "mlp.up_proj": (1024, 2816),
    "mlp.down_proj": (2816, 1024),
}  # fmt: skip


def bench_hot_swap(tmp: Path, repeat: int, layers: int = 28) -> None:
    """Decode of an fp32 revision (r=16, all linear; 28 layers: 33.5 MB) from the store, as a hot swap does."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(3)
    tensors = {}
    for i in range(layers):
        for proj, (fan_in, fan_out) in HOT_SWAP.items():
            prefix = f"base_model.model.model.layers.{i}.{proj}"
            bound = 1.0 / np.sqrt(fan_in)
            tensors[f"{prefix}.lora_A.weight"] = torch.from_numpy(
                rng.uniform(-bound, bound, (16, fan_in)).astype(np.float32)
            )
            tensors[f"{prefix}.lora_B.weight"] = torch.from_numpy(
                rng.standard_normal((fan_out, 16), dtype=np.float32) * 2e-3
            )
    src = tmp / "hot-swap-src"
    src.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(src / "adapter_model.safetensors"), metadata={"format": "pt"})
    (src / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 16,
                "lora_alpha": 32,
                "target_modules": sorted(p.rsplit(".", 1)[1] for p in HOT_SWAP),
            }
        )
    )
    size = (src / "adapter_model.safetensors").stat().st_size
    repo = porcelain.init(tmp / "hot-swap", install_hooks=False)
    result = porcelain.commit(repo, "fp32", source=src, verify=False, show_progress=False)
    rev = repo.read_revision(result.commit)
    rev.tensors()  # warm: the page cache holds the store, as on a server
    times, cpu = [], []
    for _ in range(max(repeat, 7)):
        c0, t0 = time.process_time(), time.perf_counter()
        repo.read_revision(result.commit).tensors()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peer = [
        _timed(lambda: load_file(str(src / "adapter_model.safetensors")), 1)[0]
        for _ in range(max(repeat, 7))
    ]
    repo.close()
    CPU["hot swap decode ours"] = cpu
    report(
        Result(
            f"hot swap: decode a {size / 1e6:.1f} MB fp32 revision, read_revision(c).tensors() (median)",
            _median(times),
            _median(peer),
            "s",
            "safetensors load_file of the raw file",
            "<= 80 ms",
            _median(times) <= 0.080,
            {"ours": times, "peer": peer},
        )
    )


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def bench_big(tmp: Path, layers: int, repeat: int) -> None:
    """Commit and checkout wall time of an 84 MB adapter: `mintvcs` CLI vs git, interleaved trials."""
    _compile_bytecode()
    gen = BigAdapter(layers)
    revs: list[Path] = []
    t0 = time.perf_counter()
    for k in range(repeat + 1):
        if k:
            gen.step()
        revs.append(gen.save(tmp / "big" / f"rev{k}"))
    size = (revs[0] / "adapter_model.safetensors").stat().st_size
    note(
        f"big: {layers} layers, {size / 1e6:.1f} MB bf16 per revision; built {len(revs)} revisions in {time.perf_counter() - t0:.1f} s"
    )

    # (a) first commit into a fresh repository; (b) the next revision, every tensor changed.
    first: dict[str, list[float]] = {"ours": [], "ours_noverify": [], "git": []}
    nxt: dict[str, list[float]] = {"ours": [], "ours_noverify": [], "git": []}
    for trial in range(repeat):
        for kind, flag in (("ours", []), ("ours_noverify", ["--no-verify"])):
            work = tmp / "big" / f"mint-{kind}-{trial}"
            run([*MINTVCS, "init", str(work), "--base-model", "meta-llama/Meta-Llama-3-8B"], tmp)
            copy_adapter(revs[0], work)
            first[kind].append(
                run([*MINTVCS, "commit", "-m", "rev0", *flag], work, f"first commit {kind}")
            )
            copy_adapter(revs[1], work)
            nxt[kind].append(
                run([*MINTVCS, "commit", "-m", "rev1", *flag], work, f"next revision commit {kind}")
            )
            if trial:
                shutil.rmtree(work)
        gwork = tmp / "big" / f"git-{trial}"
        git(tmp, "init", "-q", "-b", "main", str(gwork))
        copy_adapter(revs[0], gwork)
        first["git"].append(sh(gwork, "git add -A && git commit -q -m rev0", "first commit git"))
        copy_adapter(revs[1], gwork)
        nxt["git"].append(
            sh(gwork, "git add -A && git commit -q -m rev1", "next revision commit git")
        )
        if trial:
            shutil.rmtree(gwork)
    mb = f"{size / 1e6:.0f} MB bf16"
    for label, table in (("first commit", first), ("next revision commit", nxt)):
        ours, peer = _median(table["ours"]), _median(table["git"])
        report(
            Result(
                f"big {mb}, {label} (median of {repeat})",
                ours,
                peer,
                "s",
                "git add && git commit",
                ">= 5x and <= 0.5 s",
                peer / ours >= 5 and ours <= 0.5,
                {"ours": table["ours"], "peer": table["git"]},
            )
        )
        ours_nv = _median(table["ours_noverify"])
        report(
            Result(
                f"big {mb}, {label} --no-verify (median of {repeat})",
                ours_nv,
                peer,
                "s",
                "git add && git commit",
                samples={"ours": table["ours_noverify"], "peer": table["git"]},
            )
        )

    # A store with a longer XOR chain, then checkout between its root and its tip (detached).
    work, gwork = tmp / "big" / "mint-ours-0", tmp / "big" / "git-0"
    for k in range(2, len(revs)):
        copy_adapter(revs[k], work)
        run([*MINTVCS, "commit", "-m", f"rev{k}", "--no-verify"], work)
        copy_adapter(revs[k], gwork)
        sh(gwork, f"git add -A && git commit -q -m rev{k}")
    # Branches `root` and `tip` on both sides (checkout of a branch, as a user switches policies).
    back = f"HEAD~{len(revs) - 1}"
    run([*MINTVCS, "branch", "root", back], work)
    run([*MINTVCS, "branch", "tip", "HEAD"], work)
    git(gwork, "branch", "root", back)
    git(gwork, "branch", "tip", "HEAD")
    repo = Repository.open(work)
    depth = max(t.depth for t in repo.read_revision(repo.resolve("tip")).manifest.tensors)
    repo.close()
    co: dict[str, dict[str, list[float]]] = {t: {"ours": [], "peer": []} for t in ("root", "tip")}
    for _ in range(repeat):
        for target in ("root", "tip"):
            co[target]["ours"].append(
                run([*MINTVCS, "checkout", target], work, f"checkout {target} ours")
            )
            co[target]["peer"].append(
                git(gwork, "checkout", "-q", target, cpu_label=f"checkout {target} git")
            )
    # The peer for checkout is `git add && git commit` of the same file (the first
    # commit's median); `git checkout` is reported beside it.
    git_commit = _median(first["git"])
    for target, what in (("root", "depth 0"), ("tip", f"xor depth {depth}")):
        ours, peer = _median(co[target]["ours"]), _median(co[target]["peer"])
        report(
            Result(
                f"big {mb}, checkout of branch {target} ({what}, median of {repeat})",
                ours,
                git_commit,
                "s",
                "git add && git commit",
                ">= 5x and <= 0.5 s",
                git_commit / ours >= 5 and ours <= 0.5,
                {"ours": co[target]["ours"], "peer": first["git"]},
            )
        )
        report(
            Result(
                f"big {mb}, checkout of branch {target} ({what}) vs git checkout",
                ours,
                peer,
                "s",
                "git checkout",
                samples=co[target],
            )
        )
    assert (work / "adapter_model.safetensors").read_bytes() == (
        revs[-1] / "adapter_model.safetensors"
    ).read_bytes()
    # Store size of this synthetic chain, for reference (random steps are harsher than training).
    cpu = {k: _median(v) for k, v in CPU.items()}
    NOTES["cpu_s"] = cpu
    note(
        "CPU seconds (user+sys, median; less load-dependent than wall time): "
        + "; ".join(f"{k} {v:.2f}" for k, v in cpu.items())
    )
    bench_single(tmp, "bf16 8B-shaped (random B)", revs[0])
    NOTES["big"] = {"bytes_per_revision": size, "revisions": len(revs), "xor_depth_at_tip": depth}
    split_commit(tmp, revs, repeat)
    split_checkout(work, "root", "tip", repeat)


def bench_extra(tmp: Path, megabytes: int, repeat: int, layers: int = 2) -> None:
    """A trainer's checkpoint directory: a small adapter beside a large fp32 optimizer state.
    Commit (first revision) and a clean status, `mintvcs` CLI vs git, interleaved trials."""
    _compile_bytecode()
    src = BigAdapter(layers).save(tmp / "extra" / "src")
    rng = np.random.default_rng(1)
    # Adam's two moments of fp32 parameters, as torch.save lays them out (zlib saves ~7%).
    moment = (rng.standard_normal(megabytes << 17, dtype=np.float32) * 1e-3).astype("<f4")
    state = np.concatenate([moment, moment * moment]).tobytes()
    (src / "optimizer.pt").write_bytes(state)
    note(f"extra: {len(state) / 1e6:.0f} MB optimizer.pt beside a {layers}-layer adapter")
    commit: dict[str, list[float]] = {"ours": [], "git": []}
    status: dict[str, list[float]] = {"ours": [], "git": []}
    for trial in range(repeat):
        work = tmp / "extra" / f"mint-{trial}"
        run([*MINTVCS, "init", str(work), "--base-model", "meta-llama/Meta-Llama-3-8B"], tmp)
        copy_adapter(src, work)
        shutil.copyfile(src / "optimizer.pt", work / "optimizer.pt")
        commit["ours"].append(run([*MINTVCS, "commit", "-m", "r0"], work, "extra commit ours"))
        status["ours"].append(run([*MINTVCS, "status"], work, "extra status ours"))
        gwork = tmp / "extra" / f"git-{trial}"
        git(tmp, "init", "-q", "-b", "main", str(gwork))
        copy_adapter(src, gwork)
        shutil.copyfile(src / "optimizer.pt", gwork / "optimizer.pt")
        commit["git"].append(sh(gwork, "git add -A && git commit -q -m r0", "extra commit git"))
        status["git"].append(git(gwork, "status", "--short", cpu_label="extra status git"))
        shutil.rmtree(work)
        shutil.rmtree(gwork)
    for name, times in (("commit", commit), ("clean status", status)):
        report(
            Result(
                f"{name} with a {len(state) / 1e6:.0f} MB optimizer.pt (median of {repeat})",
                _median(times["ours"]),
                _median(times["git"]),
                "s",
                "git add -A && git commit" if name == "commit" else "git status",
                samples=times,
            )
        )


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of fn() over `repeat` calls, and its last result."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return _median(times), result


def split_commit(tmp: Path, revs: list[Path], repeat: int) -> None:
    """Where `mintvcs commit` spends its time, phase by phase on one thread, and end to end in-process."""
    adapter_dir, parent_dir = revs[1], revs[0]
    t_start, _ = _timed(
        lambda: run(
            [sys.executable, "-c", "import mintvcs.cli, mintvcs.porcelain, numpy, zstandard"], tmp
        ),
        repeat,
    )
    t_read, adapter = _timed(lambda: read_adapter(adapter_dir), repeat)
    n = len(adapter.layout.tensors)
    views = [adapter.tensor_bytes(i) for i in range(n)]
    t_sha, _ = _timed(lambda: [hashlib.sha256(v).hexdigest() for v in views], repeat)
    t_enc, blobs = _timed(
        lambda: [
            codec.encode(v, e.dtype, e.shape)
            for v, e in zip(views, adapter.layout.tensors, strict=True)
        ],
        repeat,
    )
    parent = read_adapter(parent_dir)
    bases = [bytes(parent.tensor_bytes(i)) for i in range(n)]
    fake = "0" * 40
    t_xor, _ = _timed(
        lambda: [
            codec.encode(v, e.dtype, e.shape, base=b, base_id=fake)
            for v, e, b in zip(views, adapter.layout.tensors, bases, strict=True)
        ],
        repeat,
    )
    t_dec, _ = _timed(lambda: [codec.decode(b) for b in blobs], repeat)

    def write_objects() -> None:
        from mintvcs.packs import TENSOR_ZLIB_LEVEL, PackWriter

        work = Path(tempfile.mkdtemp(dir=tmp, prefix="objs-"))
        repo = Repository.init(work)
        pack = PackWriter(repo)  # as a commit of >= PACK_THRESHOLD tensors writes them
        for b in blobs:
            pack.add(b"blob", [b], TENSOR_ZLIB_LEVEL, codec.read_header(b).payload_offset)
        pack.finish()
        repo.close()

    t_write, _ = _timed(write_objects, repeat)
    hook = tmp / "big" / "mint-ours-0" / ".mint" / "hooks" / "pre-commit"
    hook_env = {**ENV, "MINT_ADAPTER_DIR": str(adapter_dir), "MINT_PYTHON": sys.executable}
    t_hook, _ = _timed(
        lambda: subprocess.run([str(hook)], env=hook_env, check=True, capture_output=True), repeat
    )

    def commit_pair() -> float:
        work = Path(tempfile.mkdtemp(dir=tmp, prefix="inproc-"))
        repo = porcelain.init(work, install_hooks=False)
        porcelain.commit(repo, "rev0", source=parent_dir, verify=False, show_progress=False)
        t0 = time.perf_counter()
        porcelain.commit(repo, "rev1", source=adapter_dir, verify=False, show_progress=False)
        elapsed = time.perf_counter() - t0
        repo.close()
        shutil.rmtree(work)
        return elapsed

    t_first, _ = _timed(lambda: _first_commit(tmp, parent_dir), repeat)
    t_next = _median([commit_pair() for _ in range(repeat)])
    split = {
        "process start + imports": t_start, "pre-commit hook (separate process)": t_hook,
        "read adapter": t_read, "sha256 of tensors": t_sha,
        "encode, planes only (1 thread)": t_enc, "encode with XOR try (1 thread)": t_xor,
        "write the blobs as one pack": t_write, "decode (1 thread)": t_dec,
        "porcelain.commit first, in-process": t_first, "porcelain.commit next revision, in-process": t_next,
    }  # fmt: skip
    NOTES["commit_split_s"] = split
    note("commit split (medians): " + "; ".join(f"{k} {v * 1e3:.0f} ms" for k, v in split.items()))


def _first_commit(tmp: Path, adapter_dir: Path) -> None:
    work = Path(tempfile.mkdtemp(dir=tmp, prefix="inproc-"))
    repo = porcelain.init(work, install_hooks=False)
    porcelain.commit(repo, "rev0", source=adapter_dir, verify=False, show_progress=False)
    repo.close()
    shutil.rmtree(work)


def split_checkout(work: Path, root: str, tip: str, repeat: int) -> None:
    """Where `mintvcs checkout` spends its time, in-process."""
    repo = Repository.open(work)
    try:
        t_status, _ = _timed(lambda: porcelain.status(repo), repeat)
        tip_id = repo.resolve(tip)
        t_rev, rev = _timed(lambda: repo.read_revision(tip_id), repeat)
        t_dec, _ = _timed(lambda: rev.tensors(), repeat)
        t_asm, data = _timed(lambda: rev.safetensors_bytes(), repeat)
        out = work.parent / "checkout-probe.safetensors"
        t_write, _ = _timed(lambda: out.write_bytes(data), repeat)
        out.unlink()

        def both() -> None:
            porcelain.checkout(repo, root)
            porcelain.checkout(repo, tip)

        t_both, _ = _timed(both, repeat)
    finally:
        repo.close()
    split = {
        "status (dirty check)": t_status, "read revision": t_rev, "decode all tensors (pool)": t_dec,
        "decode + assemble file": t_asm, "write file": t_write, "porcelain.checkout, in-process": t_both / 2,
    }  # fmt: skip
    NOTES["checkout_split_s"] = split
    note(
        "checkout split (medians): " + "; ".join(f"{k} {v * 1e3:.0f} ms" for k, v in split.items())
    )


# ------------------------------------------- 5. an MoE adapter's metadata under gc
def _moe_safetensors(path: Path, modules: list[str], data: np.ndarray) -> None:
    """A safetensors file of rank-4 bf16 LoRA pairs, one per module, the rows of `data` as values."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for module in modules:
        for ab, shape in (("A", [4, 8]), ("B", [8, 4])):
            end = offset + 64
            header[f"{module}.lora_{ab}.weight"] = {
                "dtype": "BF16", "shape": shape, "data_offsets": [offset, end],
            }  # fmt: skip
            offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data.tobytes())


def _read_times(work: Path, commits: list[str]) -> list[float]:
    """Seconds of `read_revision` of each commit, in a Repository of its own each."""
    times = []
    for commit in commits:
        repo = Repository.open(work)
        t0 = time.perf_counter()
        repo.read_revision(commit)
        times.append(time.perf_counter() - t0)
        repo.close()
    return times


def _gc_both(folder: Path) -> dict[str, float]:
    """Seconds of `mintvcs gc` of folder/deltas, and of folder/whole without deltas."""
    took = {}
    for name, depth in (("deltas", maintenance.DELTA_DEPTH), ("whole", 0)):
        saved, maintenance.DELTA_DEPTH = maintenance.DELTA_DEPTH, depth
        try:
            t0 = time.perf_counter()
            maintenance.gc(folder / name)
            took[name] = time.perf_counter() - t0
        finally:
            maintenance.DELTA_DEPTH = saved
    return took


def bench_meta(tmp: Path, layers: int, experts: int, revisions: int, repeat: int) -> None:
    """An MoE-shaped adapter of many tiny tensors (48 layers x 128 experts x 3 projections x A/B
    and the attention's: 37,248), `revisions` revisions with 1% of its tensors changed in each:
    the store after `mintvcs gc` against gc without metadata deltas (DELTA_DEPTH 0: every object
    whole, as gc wrote them before) and `git repack -adf`; gc's time, a second gc's after one
    more revision, and read_revision / checkout of the newest and the deepest revision."""
    modules = [
        f"base_model.model.model.layers.{layer}.{name}"
        for layer in range(layers)
        for name in [
            *(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")),
            *(f"mlp.experts.{e}.{p}" for e in range(experts) for p in ("gate", "up", "down")),
        ]
    ]
    count = 2 * len(modules)
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(count * 32).astype("<f4").view("<u4") >> 16).astype("<u2")
    rows = data.reshape(count, 32)  # a 4x8 bf16 tensor each
    work = tmp / "meta" / "deltas"
    repo = porcelain.init(work, install_hooks=False)
    (work / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "task_type": "CAUSAL_LM",
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate", "up",
                                       "down"]})
    )  # fmt: skip

    def next_revision(message: str) -> None:
        _moe_safetensors(work / "adapter_model.safetensors", modules, data)
        porcelain.commit(repo, message, verify=False, show_progress=False)
        changed = rng.choice(count, count // 100, replace=False)
        rows[changed] ^= rng.integers(1, 4, (len(changed), 32), dtype="<u2")

    t0 = time.perf_counter()
    for step in range(revisions):
        next_revision(f"step {step}")
    repo.close()
    note(
        f"meta: {count} tensors, {revisions} revisions (1% changed each) committed in "
        f"{time.perf_counter() - t0:.1f} s; .mint/objects {fmt(tree_bytes(work / '.mint' / 'objects'), 'B')} before gc"
    )
    stores = {name: tmp / "meta" / name for name in ("whole", "git", "git-zlib")}
    for other in stores.values():
        shutil.copytree(work, other, symlinks=True)
    gc_time = _gc_both(tmp / "meta")
    git_time = git(stores["git"], "--git-dir", ".mint", "repack", "-adf", "-q")
    git(
        stores["git-zlib"], "--git-dir", ".mint", "-c", "pack.compression=6", "repack", "-adf", "-q"
    )
    size = {name: tree_bytes(tmp / "meta" / name / ".mint" / "objects")
            for name in ("deltas", "whole", "git", "git-zlib")}  # fmt: skip
    label = f"meta ({count} tensors, {revisions} revisions, 1% changed each)"
    report(Result(f"{label}, .mint after gc vs gc without deltas", size["deltas"],
                  size["whole"], "B", "every object whole, as gc wrote before"))  # fmt: skip
    report(Result(f"{label}, .mint after gc vs git repack -adf", size["deltas"], size["git"], "B",
                  "git repack -adf, the store's pack.compression=0"))  # fmt: skip
    report(Result(f"{label}, .mint after gc vs git repack -adf, zlib", size["deltas"],
                  size["git-zlib"], "B", "git -c pack.compression=6 repack -adf"))  # fmt: skip
    report(Result(f"{label}, gc time", gc_time["deltas"], gc_time["whole"], "s",
                  "gc without deltas"))  # fmt: skip
    note(f"meta: git repack -adf {git_time:.2f} s")
    commits = (
        subprocess.run(["git", "--git-dir", str(work / ".mint"), "rev-list", "HEAD"],
                       capture_output=True, text=True, check=True).stdout.split()
    )  # fmt: skip
    reads = {name: _read_times(tmp / "meta" / name, commits) for name in ("deltas", "whole")}
    note(
        "meta: read_revision newest first, ms: deltas "
        + " ".join(f"{t * 1e3:.0f}" for t in reads["deltas"])
        + "; whole "
        + " ".join(f"{t * 1e3:.0f}" for t in reads["whole"])
    )
    # The oldest revision sits deepest in its chain (its manifest is `revisions - 1` deltas down).
    for which, index in (("newest", 0), ("deepest", len(commits) - 1)):
        again = {
            name: _median([_read_times(tmp / "meta" / name, [commits[index]])[0]
                           for _ in range(repeat)])
            for name in ("deltas", "whole")
        }  # fmt: skip
        report(Result(f"{label}, read_revision of the {which} revision", again["deltas"],
                      again["whole"], "s", "its objects whole"))  # fmt: skip
    for which, index in (("newest", 0), ("deepest", len(commits) - 1)):
        took = {}
        for name in ("deltas", "whole"):
            times = []
            with Repository.open(tmp / "meta" / name) as repo:
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    porcelain.checkout(repo, commits[index], force=True)
                    times.append(time.perf_counter() - t0)
                porcelain.checkout(repo, commits[0], force=True)
            took[name] = _median(times)
        report(Result(f"{label}, checkout (in-process) of the {which} revision", took["deltas"],
                      took["whole"], "s", "its objects whole"))  # fmt: skip
    # One more revision, and gc again: it reuses the deltas in the store, searching the new
    # revision's pair alone.
    repo = Repository.open(work)
    next_revision("one more")
    repo.close()
    shutil.rmtree(stores["whole"])
    shutil.copytree(work, stores["whole"], symlinks=True)
    gc_time = _gc_both(tmp / "meta")
    report(Result(f"{label}, a second gc after one more revision", gc_time["deltas"],
                  gc_time["whole"], "s", "gc without deltas"))  # fmt: skip


# --------------------------------------------------------------------- main
def main() -> None:
    """Parse arguments, run the sections, print lines and optionally write JSON."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: every section at its least (3 revisions, 1 layer, one trial); "
        "its figures mean nothing",
    )
    ap.add_argument(
        "--json", metavar="PATH", help="also write results as JSON to PATH ('-' for stdout)"
    )
    ap.add_argument(
        "--only",
        choices=["chain", "big", "swap", "extra", "meta"],
        help="run one part (chain includes single)",
    )
    ap.add_argument(
        "--repeat", type=int, help="trials per timing (at least 3; default 5, with --quick 1)"
    )
    ap.add_argument("--keep", metavar="DIR", help="build in DIR and keep it (default: a temp dir)")
    args = ap.parse_args()
    repeat = 1 if args.quick and args.repeat is None else max(3, args.repeat or 5)
    steps, layers = (3, 1) if args.quick else (50, 32)
    note(
        f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}, "
        f"git {subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.split()[-1]}, "
        f"zstandard {zstandard.__version__}"
    )
    with tempfile.TemporaryDirectory(prefix="mint-bench-store-") as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "chain"):
            revs = train_chain(tmp, steps, QUICK_CHAIN_BASE if args.quick else CHAIN_BASE)
            bench_chain(tmp, revs)
            bench_single(tmp, f"bf16 (chain step {steps})", revs[-1], 1.45)
            bench_single(tmp, "fp32 (its master)", tmp / "revs" / "last-fp32", 1.15)
        if args.only in (None, "swap"):
            bench_hot_swap(tmp, repeat, 1 if args.quick else 28)
        if args.only in (None, "big"):
            bench_big(tmp, layers, repeat)
        if args.only in (None, "meta"):
            bench_meta(tmp, *((1, 16, 2) if args.quick else (48, 128, 10)), repeat)
        if args.only in (None, "extra"):
            bench_extra(tmp, 1 if args.quick else 256, repeat, 1 if args.quick else 2)
    note(f"load at end {os.getloadavg()[0]:.2f}")
    if args.json:
        payload = {
            "results": [{**asdict(r), "ratio": r.ratio} for r in RESULTS],
            "notes": NOTES,
            "cpus": os.cpu_count(),
            "quick": args.quick,
        }
        text = json.dumps(payload, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
