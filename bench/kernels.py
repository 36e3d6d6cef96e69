"""Benchmark the multi-LoRA op: the CPU backend against its peers, and on CUDA the Triton kernels.

Prints `name: ours X, peer Y, ratio Z` lines, where ratio = peer time / our time (above 1: ours
is faster). On CPU the pairs are timed interleaved in one run, best of several rounds, because
the machines here are noisy and absolute times do not compare between runs (the reference
loop, slow, best of 2 on its own). On CUDA each time is the median of triton.testing.do_bench's
reps (the L2 cache flushed before each), the four of a case measured one after another.

    python bench/kernels.py            # CPU always; CUDA parity grid + GPU timings when CUDA is present
    python bench/kernels.py --json out.json --no-cpu --skip-parity   # bench/gpu.sh's call

A failed parity grid is reported (a PARITY FAILED banner) but does not stop the timings: on a
lent GPU the figures are worth having either way. --json is rewritten after every measured case,
so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from mintvcs.kernels import add_lora, add_lora_reference, group_tokens

ROOT = Path(__file__).resolve().parent.parent
Fn = Callable[[], object]


def best_of(fns: dict[str, Fn], budget_s: float, rounds: int = 7) -> dict[str, float]:
    """Seconds per call of each fn: rounds interleaved so that noise hits all of them alike."""
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        fn()  # warm up (allocator, caches, lazy plans)
        t = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t, 1e-7)
        reps[name] = max(1, int(budget_s / rounds / len(fns) / once))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / reps[name])
    return best


class Results(list[dict[str, object]]):
    """The measured records; with a path, the JSON file is rewritten after each one."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self.path = path

    def append(self, item: dict[str, object]) -> None:
        """Keep one record and save all of them (a timeout must not lose what was measured)."""
        super().append(item)
        if self.path is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("w") as f:
                json.dump(list(self), f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)  # whole files only, even if killed mid-write


def line(name: str, ours: float, peer: float, peer_name: str, results: Results) -> None:
    """Print one comparison and keep it for --json."""
    print(
        f"{name}: ours {ours * 1e6:.1f} us, {peer_name} {peer * 1e6:.1f} us, ratio {peer / ours:.2f}",
        flush=True,
    )
    results.append(
        {"name": name, "ours_s": ours, "peer": peer_name, "peer_s": peer, "ratio": peer / ours}
    )


def peft_layer(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: int) -> torch.nn.Module:
    """A PEFT LoRA Linear holding slot s's factors as adapter 'a{s}'."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    slots, rank, k = a.shape
    base = torch.nn.Linear(k, w.shape[0], bias=False)
    base.weight.data.copy_(w)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0)
    layer = PeftLinear(base, "a0", config=cfg, r=rank, lora_alpha=alpha)
    for s in range(1, slots):
        layer.update_layer(f"a{s}", rank, alpha, config=cfg)
    with torch.no_grad():
        for s in range(slots):
            for mod, value in ((layer.lora_A[f"a{s}"], a[s]), (layer.lora_B[f"a{s}"], b[s])):
                assert isinstance(mod, torch.nn.Linear)
                mod.weight.copy_(value)
    return layer.eval()


def per_adapter(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """PEFT's mixed-batch LoRA update on its own: per adapter, mask the rows, A then B, add back."""
    for s in torch.unique(slots).tolist():
        if s < 0:
            continue
        rows = (slots == s).nonzero().flatten()
        y[rows] += ((x[rows] @ a[s].T) @ b[s].T) * float(scales[s])


def cpu_bench(results: Results, quick: bool) -> None:
    """The torch backend against the reference loop, PEFT's per-adapter update and PEFT itself."""
    torch.manual_seed(0)
    budget = 0.3 if quick else 1.2
    cases = [
        ("decode", 32, 1024, "random"),
        ("decode", 32, 512, "random"),
        ("decode", 8, 1024, "random"),
        ("prefill", 512, 1024, "random"),
        ("prefill", 512, 1024, "requests"),
    ]
    slots_n, rank, alpha = 8, 16, 32
    print(
        f"# CPU ({torch.get_num_threads()} threads), fp32, {slots_n} slots, rank {rank}; "
        "ratio = peer/ours",
        flush=True,
    )
    for kind, tokens, width, mix in cases:
        cpu_case(results, kind, tokens, width, mix, slots_n, rank, alpha, budget)


def cpu_case(
    results: Results,
    kind: str,
    tokens: int,
    width: int,
    mix: str,
    slots_n: int,
    rank: int,
    alpha: int,
    budget: float,
) -> None:
    """One CPU shape: ours against the reference loop, the per-adapter update and PEFT."""
    x = torch.randn(tokens, width)
    w = torch.randn(width, width) / width**0.5
    a = torch.randn(slots_n, rank, width) / width**0.5
    b = torch.randn(slots_n, width, rank) / rank**0.5
    scales = torch.full((slots_n,), alpha / rank)
    if mix == "random":
        slots = torch.randint(0, slots_n, (tokens,), dtype=torch.int32)
    else:  # prefill of 8 requests of uneven length, each on its own adapter
        cuts = (torch.linspace(0, 1, slots_n + 1) ** 2 * tokens).long()
        slots = torch.bucketize(torch.arange(tokens), cuts[1:-1], right=True).to(torch.int32)
    groups = group_tokens(slots, slots_n)
    y = torch.zeros(tokens, width)
    tag = f"cpu {kind} T={tokens} K=N={width} {mix}"

    # What is timed must be right: ours == PEFT on these inputs.
    peft = peft_layer(w, a, b, alpha)
    names = [f"a{s}" for s in slots.tolist()]
    with torch.no_grad():
        want = peft(x, adapter_names=names)
        got = add_lora(F.linear(x, w), x, a, b, groups, scales, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        t = best_of(
            {
                "ours": lambda: add_lora(y, x, a, b, groups, scales, backend="torch"),
                "ours_raw_slots": lambda: add_lora(y, x, a, b, slots, scales, backend="torch"),
                "group_tokens": lambda: group_tokens(slots, slots_n),
                "per_adapter": lambda: per_adapter(y, x, a, b, slots, scales),
                "base": lambda: F.linear(x, w),
                "ours_layer": lambda: add_lora(
                    F.linear(x, w), x, a, b, groups, scales, backend="torch"
                ),
                "peft_layer": lambda: peft(x, adapter_names=names),
            },
            budget,
        )
        ref = best_of(
            {"reference": lambda: add_lora_reference(y, x, a, b, slots, scales)},
            budget / 4,
            rounds=2,
        )["reference"]
    line(f"{tag} lora vs reference loop", t["ours"], ref, "reference", results)
    line(f"{tag} lora vs per-adapter", t["ours"], t["per_adapter"], "per-adapter", results)
    line(f"{tag} linear+lora vs peft Linear", t["ours_layer"], t["peft_layer"], "peft", results)
    print(
        f"  {tag}: lora {100 * t['ours'] / t['base']:.0f}% of base linear "
        f"({t['base'] * 1e6:.0f} us); group_tokens {t['group_tokens'] * 1e6:.0f} us once per step; "
        f"add_lora from raw token_slots {t['ours_raw_slots'] * 1e6:.0f} us",
        flush=True,
    )
    results.append({"name": f"{tag} detail", **t, "reference": ref})


def gpu_parity() -> bool:
    """The CUDA parity grid (tests/kernels/test_gpu.py), compiled kernels, before any timing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--maxfail=5",
        "-p",
        "no:cacheprovider",
        "-m",
        "gpu",
        "tests/kernels/test_gpu.py",
    ]
    print("# CUDA parity grid:", " ".join(cmd[2:]), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    # The failures' summary lines (pytest -ra) and the count, not the whole log.
    tail = [ln for ln in done.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    print("\n".join([*tail[:10], *done.stdout.strip().splitlines()[-1:]]), flush=True)
    return done.returncode == 0


def gpu_bench(results: Results, peak_bps: float) -> None:
    """Triton op vs torch gather+bmm vs the base linear, K = N = 4096, fp16."""
    dev, dt, k = torch.device("cuda"), torch.float16, 4096
    name = torch.cuda.get_device_name(dev)
    print(
        f"# GPU {name}, fp16, K=N={k}, peak {peak_bps / 1e12:.1f} TB/s; ratio = peer/ours",
        flush=True,
    )
    torch.manual_seed(0)
    w = torch.randn(k, k, device=dev, dtype=dt) / k**0.5
    for rank in (16, 64):
        for active in (1, 8, 64):
            a = torch.randn(active, rank, k, device=dev, dtype=dt) / k**0.5
            b = torch.randn(active, k, rank, device=dev, dtype=dt) / rank**0.5
            for tokens in (1, 16, 64, 256, 2048):
                try:
                    gpu_case(results, w, a, b, tokens, peak_bps)
                except Exception as e:  # one broken shape must not cost the others' figures
                    tag = f"gpu T={tokens} slots={active} R={rank}"
                    print(f"{tag}: ERROR {type(e).__name__}: {e}", flush=True)
                    results.append({"name": tag, "error": f"{type(e).__name__}: {e}"})


def gpu_case(
    results: Results,
    w: torch.Tensor,  # [N, K]
    a: torch.Tensor,  # [slots, rank, K]
    b: torch.Tensor,  # [slots, N, rank]
    tokens: int,
    peak_bps: float,
) -> None:
    """One GPU shape: the Triton op, its shrink alone, torch gather+bmm and the base linear."""
    import triton.testing

    from mintvcs.kernels.checks import check_call
    from mintvcs.kernels.triton_ops import add_lora_triton

    active, rank, k = a.shape
    dev, dt = a.device, a.dtype
    scales = torch.ones(active, device=dev)
    x = torch.randn(tokens, k, device=dev, dtype=dt)
    y = torch.zeros(tokens, k, device=dev, dtype=dt)
    slots = (torch.arange(tokens, device=dev) % active).to(torch.int32)
    groups = group_tokens(slots, active)
    check_call(y, x, [(a, b)], scales, None, tokens, dev)
    live = min(active, tokens)

    def ours() -> None:
        add_lora_triton(y, x, [(a, b)], groups, scales, None)

    def shrink() -> None:
        add_lora_triton(y, x, [(a, b)], groups, scales, None, shrink_only=True)

    def gather_bmm() -> None:
        sl = slots.long()
        h = torch.bmm(x[:, None, :], a[sl].transpose(1, 2))  # [T, 1, R]
        y.add_(torch.bmm(h, b[sl].transpose(1, 2))[:, 0] * scales[sl, None].to(dt))

    def timed(fn: Fn) -> float:
        """Seconds per call: the median of do_bench's reps (its default is the mean)."""
        return float(triton.testing.do_bench(fn, return_mode="median")) * 1e-3

    t_ours, t_shrink, t_peer, t_base = map(timed, (ours, shrink, gather_bmm, lambda: x @ w.T))
    el = x.element_size()
    # Compulsory traffic: x and each live slot's A once, the fp32 buffer out and back,
    # each live slot's B once, y read and written.
    shrink_bytes = el * (tokens * k + live * rank * k) + 4 * tokens * rank
    op_bytes = shrink_bytes + 4 * tokens * rank + el * (live * k * rank + 2 * tokens * k)
    tag = f"gpu T={tokens} slots={active} R={rank}"
    line(f"{tag} lora vs gather+bmm", t_ours, t_peer, "gather+bmm", results)
    print(
        f"  {tag}: lora {100 * t_ours / t_base:.1f}% of base ({t_base * 1e6:.1f} us); "
        f"op {op_bytes / t_ours / 1e12:.2f} TB/s ({100 * op_bytes / t_ours / peak_bps:.0f}% of peak); "
        f"shrink {shrink_bytes / t_shrink / 1e12:.2f} TB/s "
        f"({100 * shrink_bytes / t_shrink / peak_bps:.0f}%)",
        flush=True,
    )
    results.append(
        {
            "name": f"{tag} detail",
            "ours_s": t_ours,
            "shrink_s": t_shrink,
            "gather_bmm_s": t_peer,
            "base_s": t_base,
            "bytes": op_bytes,
            "shrink_bytes": shrink_bytes,
            "gpu": torch.cuda.get_device_name(dev),
        }
    )


PARITY_BANNER = (
    "#" * 72 + "\n# PARITY FAILED: the CUDA parity grid found wrong results; the GPU timings\n"
    "# here are of kernels that are not right. See the FAILED lines above.\n" + "#" * 72
)


def main() -> None:
    """Run the CPU benchmark, and the CUDA parity grid and GPU benchmark when CUDA is present."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--quick", action="store_true", help="shorter timing budget (noisier)")
    p.add_argument("--no-cpu", action="store_true", help="skip the CPU benchmark")
    p.add_argument(
        "--skip-parity",
        action="store_true",
        help="skip the CUDA parity grid (bench/gpu.sh runs it in the step before)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: on a shared 2-core machine, OpenMP "
        "barriers make 2-thread timings swing by 10x)",
    )
    p.add_argument("--peak-tbps", type=float, default=4.8, help="GPU memory bandwidth (H200: 4.8)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = Results(args.json)
    start = time.time()
    if not args.no_cpu:
        cpu_bench(results, args.quick)
    parity_ok = True
    if torch.cuda.is_available():
        if not args.skip_parity:
            parity_ok = gpu_parity()
            results.append({"name": "cuda parity grid", "ok": parity_ok})
            if not parity_ok:
                # Timed anyway: a lent GPU is rare, and the figures still say where time goes.
                print(PARITY_BANNER, flush=True)
        gpu_bench(results, args.peak_tbps * 1e12)
    else:
        print("# no CUDA: GPU figures not measured", flush=True)
    if not parity_ok:
        print(PARITY_BANNER, flush=True)
    print(f"# done in {time.time() - start:.0f} s", flush=True)
    if args.json and not results:  # an empty run still replaces an earlier run's file
        results.append({"name": "nothing measured", "cuda": torch.cuda.is_available()})
    if not parity_ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
