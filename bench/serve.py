"""Serving benchmark over HTTP on loopback, against PEFT's mixed-adapter batch generate.

Measured side by side in one run on one locally built Llama-shaped model (random weights, nothing
downloaded; by default the ~30M-parameter shape of bench/engine.py's throughput run). The server
is `mintvcs serve` in its own process, as users run it:

- throughput (completion tokens/s) and p50/p99 request latency with 1, 8 and 32 distinct refs
  active, every request its own HTTP call, `--concurrency` of them in flight;
- hot swap: time from `porcelain.commit` returning to the first response naming the new revision;
- the same prompts and adapters through PEFT: one `generate(..., adapter_names=[...])` per batch of
  `--concurrency` prompts (PEFT's mixed-batch LoRA inference). Goal: ours >= 3x PEFT tokens/s.

Every request generates exactly `--max-tokens` tokens (ignore_eos / min_new_tokens), greedy.
Prints `name: ours X, peer Y, ratio Z` lines.

    python bench/serve.py                        # the engine benchmark's ~30M Llama, r=16
    python bench/serve.py --hidden 256 --layers 4 --rank 8   # a 2.6M toy: per-op overhead dominates
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.engine import THROUGHPUT_MODEL, load_peft
from mintvcs import porcelain
from mintvcs.serve.model import LORA_MODULES
from mintvcs.serve.tiny import TinyConfig, build_tiny_model

# How long one hot swap may take to show, and one request to answer, before the run gives up.
SWAP_TIMEOUT_S = 30.0


class ServerProcess:
    """`mintvcs serve ARGS` in a subprocess, up and healthy inside the with-block."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.url = ""
        self.proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "MINT_LOG_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mintvcs.serve.cli", "serve", *self.args],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"mintvcs serve did not start: {line!r}")
        self.url = match.group(1)
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise RuntimeError("mintvcs serve never became healthy")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def make_adapters(base: Path, root: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT LoRA adapters on all linears, saved by PEFT, with random non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            target_modules=list(LORA_MODULES),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    out = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(
                        torch.randn(param.shape, generator=gen)
                        * (0.05 if "lora_B" in name else 0.1)
                    )
        path = root / f"adapter-{i:02d}"
        peft_model.save_pretrained(str(path))
        out.append(path)
    return out


# Words the benchmark prompts are made of; any words work.
PROMPT_WORDS = (
    *("the", "model", "answer", "adapter", "revision", "base", "team", "branch", "product"),
    *("policy", "user", "yes", "no", "hello", "world", "what", "is", "capital", "of", "france"),
    *("paris", "keeps", "moves", "only", "many", "times", "continuous", "evaluation"),
)


def prompts(count: int, tokens: int, tokenizer: Any) -> list[list[int]]:
    """Distinct prompts of exactly `tokens` ids whose text encodes back to the same ids.

    The HTTP API takes text and PEFT takes ids: both must see the same tokens, or the two sides
    would prefill (and, at the context limit, generate) different amounts.
    """
    import random

    gen = random.Random(0)
    out: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(100 * count):
        text, ids = "", list[int]()
        while len(ids) < tokens:
            longer = f"{text} {gen.choice(PROMPT_WORDS)}" if text else gen.choice(PROMPT_WORDS)
            longer_ids = tokenizer.encode(longer).ids
            if len(longer_ids) > tokens:
                break
            text, ids = longer, longer_ids
        stable = len(ids) == tokens and tokenizer.encode(tokenizer.decode(ids)).ids == ids
        if stable and tuple(ids) not in seen:
            seen.add(tuple(ids))
            out.append(ids)
            if len(out) == count:
                return out
    raise RuntimeError(f"could not build {count} distinct {tokens}-token prompts")


def build_repo(base: Path, adapters: list[Path], root: Path) -> tuple[Any, list[str]]:
    """main holds adapter 0; branch ref-NN holds adapter NN; returns the repo and the ref names."""
    repo = porcelain.init(root / "repo", str(base))
    refs = []
    for i, adapter in enumerate(adapters):
        name = "main" if i == 0 else f"ref-{i:02d}"
        if i:
            porcelain.checkout(repo, "main", new_branch=name, force=True)
        porcelain.commit(repo, f"adapter {i}", source=adapter, verify=False, show_progress=False)
        refs.append(name)
    porcelain.checkout(repo, "main", force=True)
    return repo, refs


async def http_run(
    url: str, reqs: list[tuple[list[int], str]], max_tokens: int, concurrency: int
) -> tuple[float, list[float], int]:
    """Send requests (`concurrency` in flight); (wall seconds, per-request latencies, completion tokens)."""
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0

    async def one(session: aiohttp.ClientSession, ids: list[int], ref: str) -> None:
        nonlocal tokens
        # The HTTP API takes text; prompts() made sure it encodes back to these ids.
        async with sem:
            start = time.perf_counter()
            async with session.post(
                url + "/generate",
                json={
                    "prompt": PROMPT_TEXT[tuple(ids)],
                    "ref": ref,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            ) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"{resp.status}: {body}")
            latencies.append(time.perf_counter() - start)
            tokens += body["usage"]["completion_tokens"]

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(one(session, ids, ref) for ids, ref in reqs))
        wall = time.perf_counter() - start
    return wall, latencies, tokens


PROMPT_TEXT: dict[tuple[int, ...], str] = {}


def peft_run(
    base: Path, adapters: list[Path], reqs: list[tuple[list[int], int]], max_tokens: int, batch: int
) -> tuple[float, int]:
    """PEFT mixed-adapter batches; (wall seconds, completion tokens)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    used = sorted({a for _, a in reqs})
    peft_model = load_peft(base, {f"a{i}": adapters[i] for i in used}, device)
    if device == "cuda":
        # Off the clock, as our server's warm-up is: the first generate on a GPU pays for
        # cuBLAS handles and kernel loading.
        ids = torch.tensor([p for p, _ in reqs[:batch]], device=device)
        with torch.no_grad():
            peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=[f"a{a}" for _, a in reqs[:batch]],
                max_new_tokens=2,
                do_sample=False,
                pad_token_id=2,
            )
        torch.cuda.synchronize()
    tokens = 0
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(reqs), batch):
            chunk = reqs[k : k + batch]
            ids = torch.tensor([p for p, _ in chunk], device=device)
            out = peft_model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=[f"a{a}" for _, a in chunk],
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=2,
            )
            tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def save_json(path: Path, results: dict[str, Any]) -> None:
    """Write `results` to `path` whole: a timeout killing the run mid-write leaves the last copy."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def wait_for_revision(ask: Callable[[], str], revision: str, timeout_s: float) -> float | None:
    """Seconds until `ask()` names `revision`, or None when it has not within `timeout_s`."""
    start = time.perf_counter()
    while ask() != revision:
        if time.perf_counter() - start > timeout_s:
            return None
    return time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def main() -> None:
    """Run every measurement and print the comparison lines."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--hidden",
        type=int,
        default=None,
        help="Build a Llama of this width instead of the engine benchmark's ~30M model.",
    )
    parser.add_argument("--layers", type=int, default=4, help="Layers, with --hidden.")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument(
        "--refs",
        default="1,8,32",
        help="Distinct refs active in each throughput row, comma-separated; as many adapters "
        "as the largest.",
    )
    parser.add_argument("--repeat", type=int, default=2, help="Runs of ours and of PEFT; best.")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = parser.parse_args()
    ref_counts = [int(n) for n in args.refs.split(",")]

    root = Path(tempfile.mkdtemp(prefix="mintvcs-bench-serve-"))
    try:
        if args.hidden is None:
            config = THROUGHPUT_MODEL  # the engine benchmark's ~30M Llama, r=16 by default
        else:
            heads = max(4, args.hidden // 64)
            config = TinyConfig(
                hidden_size=args.hidden,
                intermediate_size=args.hidden * 2,
                num_hidden_layers=args.layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
            )
        base = build_tiny_model(root / "base", config)
        # The hot swap commits adapter i + 1 on main for its i-th swap.
        adapters = make_adapters(
            base, root / "adapters", max(*ref_counts, args.swaps + 1), args.rank
        )
        repo, refs = build_repo(base, adapters, root)
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
        all_prompts = prompts(args.requests, args.prompt_tokens, tokenizer)
        for p in all_prompts:
            PROMPT_TEXT[tuple(p)] = tokenizer.decode(p)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        params = sum(
            v.numel()
            for v in __import__("safetensors.torch", fromlist=["load_file"])
            .load_file(str(base / "model.safetensors"))
            .values()
        )
        print(
            f"# model: Llama hidden={config.hidden_size} layers={config.num_hidden_layers} ({params / 1e6:.1f}M params) on {device}; "
            f"{args.requests} requests x {args.max_tokens} tokens, concurrency {args.concurrency}, LoRA r={args.rank} on all linears"
        )
        results: dict[str, Any] = {
            "device": device,
            "params": params,
            "args": {k: str(v) for k, v in vars(args).items()},
        }

        # The server runs as `mintvcs serve` in its own process, as users run it: the HTTP
        # client and PEFT (which runs while the server idles) never share its interpreter.
        server = ServerProcess(
            [
                "--repo",
                str(root / "repo"),
                "--base-model",
                str(base),
                "--port",
                "0",
                "--max-model-len",
                str(args.prompt_tokens + args.max_tokens + 8),
                "--max-loras",
                str(max(ref_counts)),
                "--max-rank",
                str(max(16, args.rank)),
                "--max-batch-size",
                str(args.concurrency),
                "--max-tokens-limit",
                str(max(1024, args.max_tokens)),
                # Each run resends the same prompts: with the cache, longer ones than the
                # default's would skip their prefill on later runs, which PEFT cannot.
                "--no-prefix-caching",
            ]
        )
        with server:
            # Warm-up: every adapter resident once.
            asyncio.run(
                http_run(
                    server.url,
                    [(all_prompts[i % len(all_prompts)], ref) for i, ref in enumerate(refs)],
                    2,
                    args.concurrency,
                )
            )
            if device == "cuda":
                # Triton compiles a kernel variant per batch shape on first use, and 2-token
                # requests never reach the batch sizes a full run decodes at: without one
                # full-size run off the clock, the first measured (1-ref) run pays the compiles.
                started = time.perf_counter()
                asyncio.run(
                    http_run(
                        server.url,
                        [(all_prompts[i], refs[i % len(refs)]) for i in range(args.requests)],
                        args.max_tokens,
                        args.concurrency,
                    )
                )
                print(
                    f"# CUDA warm-up: one full-size run, not counted "
                    f"({time.perf_counter() - started:.1f} s)",
                    flush=True,
                )
            for n_refs in ref_counts:
                reqs = [(all_prompts[i], refs[i % n_refs]) for i in range(args.requests)]
                # Best of --repeat runs each: this shared machine moves single runs by 2x.
                runs = [
                    asyncio.run(http_run(server.url, reqs, args.max_tokens, args.concurrency))
                    for _ in range(args.repeat)
                ]
                wall, lat, tokens = min(runs, key=lambda r: r[0] / r[2])
                peft_wall, peft_tokens = min(
                    (
                        peft_run(
                            base,
                            adapters,
                            [(all_prompts[i], i % n_refs) for i in range(args.requests)],
                            args.max_tokens,
                            args.concurrency,
                        )
                        for _ in range(args.repeat)
                    ),
                    key=lambda r: r[0] / r[1],
                )
                ours, peer = tokens / wall, peft_tokens / peft_wall
                results[f"refs_{n_refs}"] = {
                    "tokens_per_s": ours,
                    "p50_s": pct(lat, 0.5),
                    "p99_s": pct(lat, 0.99),
                    "peft_tokens_per_s": peer,
                }
                print(
                    f"throughput {n_refs} refs (tokens/s): ours {ours:.1f}, peer {peer:.1f}, ratio {ours / peer:.2f}"
                )
                if args.json:  # after each row: a run cut short by a time limit keeps what it had
                    save_json(args.json, results)
                print(
                    f"latency {n_refs} refs: p50 {pct(lat, 0.5) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms"
                )

            # Hot swap: commit a new revision on main, then ask until a response names it. A
            # server that never does (a commit its ref watcher missed, a stuck request) gives up
            # after SWAP_TIMEOUT_S rather than spinning for the rest of the run's time.
            swap_times = []

            def ask() -> str:
                body = json.dumps(
                    {"prompt": "hello", "ref": "main", "max_tokens": 1, "temperature": 0}
                ).encode()
                req = urllib.request.Request(
                    server.url + "/generate",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(req, timeout=SWAP_TIMEOUT_S) as resp:
                    return str(json.loads(resp.read())["revision"])

            for i in range(args.swaps):
                ask()
                new = porcelain.commit(
                    repo,
                    f"swap {i}",
                    source=adapters[(i + 1) % len(adapters)],
                    verify=False,
                    show_progress=False,
                ).commit
                took = wait_for_revision(ask, new, SWAP_TIMEOUT_S)
                if took is None:
                    results["hot_swap_s"] = "timed out"
                    if args.json:
                        save_json(args.json, results)
                    sys.exit(f"hot swap {i}: no response named {new} within {SWAP_TIMEOUT_S} s")
                swap_times.append(took)
            swap = statistics.median(swap_times)
            results["hot_swap_s"] = swap_times
            # Peer for the swap: what merging-and-reloading would cost is a full base load; PEFT's
            # nearest equivalent is load_adapter of the new revision into a resident PeftModel.
            peft_model = load_peft(base, {"a0": adapters[0]}, device)
            peer_times = []
            for i in range(args.swaps):
                start = time.perf_counter()
                peft_model.load_adapter(str(adapters[i + 1]), adapter_name=f"s{i}")
                peft_model.set_adapter(f"s{i}")
                if device == "cuda":
                    torch.cuda.synchronize()
                peer_times.append(time.perf_counter() - start)
            peer_swap = statistics.median(peer_times)
            print(
                f"hot swap, commit to first response on the new revision (ms): ours {swap * 1000:.1f}, peer {peer_swap * 1000:.1f} (PEFT load_adapter+set_adapter, no HTTP, no commit), ratio {peer_swap / swap:.2f}"
            )
        if args.json:
            save_json(args.json, results)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
