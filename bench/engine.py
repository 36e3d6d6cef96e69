"""Engine benchmarks, each side by side with its peer in one run; prints `name: ours X, peer Y, ratio Z`.

    python bench/engine.py [--only throughput|choices|chunked|prefix|structured|hotswap|cuda] [--quick]

throughput  CPU, ~30M-parameter Llama, 32 requests over 8 adapters (r=16, all linears), 64 new tokens:
            ours vs PEFT mixed-batch generate(adapter_names=...), and vs our engine with no adapters.
choices     CPU, the same Llama: 4 prompts x n=8 sampled choices on one adapter: each prompt prefilled
            once and its KV copied to the choices, vs every choice prefilling it (same batching).
chunked     CPU, the same Llama: 16 requests decoding when a 1000-token prompt arrives; their worst
            gap between two tokens with the prompt prefilled in chunks of 128 vs in one step.
prefix      CPU, the same Llama: 32 requests over 4 adapters sharing a 512-token system prompt each,
            and an lm-eval loglikelihood batch sharing a few-shot context: with the prefix cache vs
            without (the other sections that generate run without it: they resend their prompts).
structured  CPU, the same Llama with a 32000-token BPE vocabulary: 32 requests over 8 adapters whose
            output must match a JSON schema (token masks from llguidance) vs the same requests
            unconstrained; every request writes 64 tokens either way.
hotswap     CPU, ~0.4B Llama, r=16 all-linear revision: requested -> slot ready, cold (decoded from
            the mintvcs store on disk, not in the host cache) and warm (host cache), vs loading the full
            merged checkpoint; cold twice: with the files in the OS page cache, and read from the disk.
cuda        only where CUDA exists: Llama-3-8B-shaped random bf16 base built on the GPU; 1, 8 and 64
            distinct adapters in a 64-request batch vs base-only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mintvcs import porcelain
from mintvcs.serve import (
    AdapterWeights,
    Engine,
    EngineConfig,
    PeftDirSource,
    SamplingParams,
    StoreSource,
)
from mintvcs.serve.graphs import DecodeGraphs
from mintvcs.serve.loader import ModelConfig
from mintvcs.serve.model import LORA_MODULES, Model, StepBatch
from mintvcs.serve.sampling import StructuredOutput
from mintvcs.serve.scheduler import Scheduler
from mintvcs.serve.threads import one_intraop_thread
from mintvcs.serve.tiny import TinyConfig, build_tiny_model


def report(name: str, ours: float, peer: float, unit: str, higher_is_better: bool = True) -> float:
    """Print one result line; the ratio is how many times better ours is."""
    ratio = ours / peer if higher_is_better else peer / ours
    print(f"{name}: ours {ours:.4g} {unit}, peer {peer:.4g} {unit}, ratio {ratio:.2f}x", flush=True)
    return ratio


def write_peft_adapter(
    directory: Path, config: TinyConfig, *, r: int, seed: int, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a PEFT-format LoRA (all linears) with random A and B, as PEFT names and configures it."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = {
        "self_attn.q_proj": (q_out, hidden),
        "self_attn.k_proj": (kv_out, hidden),
        "self_attn.v_proj": (kv_out, hidden),
        "self_attn.o_proj": (hidden, q_out),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (out_f, in_f) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(r, in_f, generator=gen) / in_f**0.5
            ).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_f, r, generator=gen) * 0.02).to(
                dtype
            )
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": list(LORA_MODULES),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
    return directory


# ----------------------------------------------------------------------------------- throughput
THROUGHPUT_MODEL = TinyConfig(
    arch="llama",
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    init_std=0.02,
)
# --quick is a smoke run: every section's code and lines in seconds, its figures meaningless.
# The same Llama cut to the least that runs; the vocabulary stays, as prompts draw ids below 8192.
QUICK_MODEL = replace(
    THROUGHPUT_MODEL,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def throughput_model(quick: bool) -> TinyConfig:
    """The Llama of the CPU sections: THROUGHPUT_MODEL, or QUICK_MODEL for a smoke run."""
    return QUICK_MODEL if quick else THROUGHPUT_MODEL


def throughput_workload(quick: bool) -> tuple[list[str], list[list[int]], int]:
    """The mixed-batch requests: (adapter name per request, prompt ids, new tokens each)."""
    n_requests, n_adapters, new_tokens = (4, 2, 4) if quick else (32, 8, 64)
    names = [f"a{i % n_adapters}" for i in range(n_requests)]
    gen = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 8192, (8 + (7 * i) % 33,), generator=gen).tolist()
        for i in range(n_requests)
    ]
    return names, prompts, new_tokens


def load_peft(base: Path, adapters: dict[str, Path], device: str = "cpu") -> Any:
    """transformers' model of `base` with `adapters` loaded by name through PEFT, in eval mode.

    bf16 on CUDA, fp32 on CPU, as our engine runs by default.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    hf = hf.to(device)
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(hf, str(path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model.to(device).eval()


def peft_throughput(root: Path, quick: bool) -> float:
    """PEFT's mixed-batch generate(adapter_names=...) over the workload, tokens/s (one run)."""
    names, prompts, new_tokens = throughput_workload(quick)
    adapters = sorted(set(names), key=lambda n: int(n[1:]))
    model = load_peft(root / "base-30m", {name: root / name for name in adapters})
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as decoder-only generation needs
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=names,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    assert out.shape[1] == width + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def bench_throughput(root: Path, quick: bool) -> None:
    """Mixed-batch CPU throughput: ours vs PEFT, and ours with vs without adapters."""
    names, prompts, new_tokens = throughput_workload(quick)
    n_requests = len(prompts)
    # As in a server process, only the engine's step thread computes with a thread team while
    # the engine runs (mintvcs.serve.threads).
    model = throughput_model(quick)
    with one_intraop_thread():
        base = build_tiny_model(root / "base-30m", model, seed=0)
        adapters = {
            name: write_peft_adapter(root / name, model, r=16, seed=100 + int(name[1:]))
            for name in sorted(set(names), key=lambda n: int(n[1:]))
        }
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    # Every round sends the same prompts: with prefix caching, later rounds would skip most of
    # their prefill, which PEFT cannot. This measures computing them (--only prefix measures reuse).
    config = EngineConfig(
        max_batch_size=n_requests,
        adapter_slots=len(adapters),
        max_lora_rank=16,
        max_model_len=256,
        prefix_caching=False,
    )
    with Engine(base, config, source=PeftDirSource(adapters)) as engine:
        params_count = engine.model.num_parameters
        for name in adapters:
            engine.prefetch(name).result()

        def ours(revisions: list[str | None]) -> float:
            start = time.perf_counter()
            done = engine.generate_many(
                list(zip(prompts, revisions, [params] * n_requests, strict=True))
            )
            elapsed = time.perf_counter() - start
            assert all(len(c.token_ids) == new_tokens for c in done)
            return n_requests * new_tokens / elapsed

        def peft() -> float:
            # In its own process: a second OpenMP team in the engine's process would slow the
            # engine's step thread (mintvcs.serve.threads), and PEFT gets the whole machine
            # while the engine idles.
            command = [sys.executable, __file__, "--peft-run", str(root)]
            out = subprocess.run(
                [*command, *(["--quick"] if quick else [])],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            return float(out.strip().splitlines()[-1])

        ours([None] * n_requests)  # warm-up: allocator, thread pools
        # This shared machine drifts by 2x within minutes, for us and for PEFT alike: rounds of
        # (ours with adapters, ours without, PEFT) give ratios of runs made moments apart.
        rounds = [
            (ours(list(names)), ours([None] * n_requests), peft()) for _ in range(1 if quick else 4)
        ]
    with_adapters = max(r[0] for r in rounds)
    base_only = max(r[1] for r in rounds)
    peft_tps = max(r[2] for r in rounds)
    print(
        f"# model: {params_count / 1e6:.1f}M parameters, {torch.get_num_threads()} CPU threads",
        flush=True,
    )
    report(
        f"cpu mixed batch {n_requests} requests / {len(adapters)} adapters r16 vs PEFT",
        with_adapters,
        peft_tps,
        "tok/s",
    )
    report("cpu mixed batch vs our engine without adapters", with_adapters, base_only, "tok/s")
    print(
        "# rounds (with adapters / without / PEFT, tok/s): "
        f"{[f'{w:.0f}/{b:.0f}/{p:.0f}' for w, b, p in rounds]}; median ratio in a round: "
        f"vs PEFT {statistics.median(w / p for w, _, p in rounds):.2f}x, "
        f"vs no adapters {statistics.median(w / b for w, b, _ in rounds):.2f}x",
        flush=True,
    )


# -------------------------------------------------------------------------------------- choices
def bench_choices(root: Path, quick: bool) -> None:
    """n sampled choices per prompt (RL rollouts, best-of-n): one prefill per prompt vs one per choice."""
    n_prompts, n, prompt_len, new_tokens = (1, 2, 16, 2) if quick else (4, 8, 192, 16)
    model = throughput_model(quick)
    with one_intraop_thread():
        base = build_tiny_model(root / "base-choices", model, seed=0)
        adapter = write_peft_adapter(root / "choices-a", model, r=16, seed=7)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(3, 8192, (prompt_len,), generator=gen).tolist() for _ in range(n_prompts)
    ]
    requests = [
        (
            prompt,
            "a",
            SamplingParams(max_tokens=new_tokens, temperature=1.0, seed=j, ignore_eos=True),
        )
        for prompt in prompts
        for j in range(n)
    ]
    config = EngineConfig(  # no prefix caching: `each` would reuse `shared`'s prompts
        max_batch_size=len(requests),
        adapter_slots=1,
        max_lora_rank=16,
        max_model_len=256,
        prefix_caching=False,
    )
    with Engine(base, config, source=PeftDirSource({"a": adapter})) as engine:
        engine.prefetch("a").result()

        def shared() -> tuple[float, list[list[int]]]:
            start = time.perf_counter()
            done = engine.generate_many(requests)  # one call: each prompt's choices are forks
            return time.perf_counter() - start, [c.token_ids for c in done]

        def each() -> tuple[float, list[list[int]]]:
            # One call per request, queued back to back: batched alike, every choice prefilled.
            start = time.perf_counter()
            futures = [f for r in requests for f in engine.start_many([r])]
            done = [f.result() for f in futures]
            return time.perf_counter() - start, [c.token_ids for c in done]

        shared()  # warm-up
        rounds = [(shared(), each()) for _ in range(1 if quick else 4)]
    assert all(a[1] == b[1] for a, b in rounds), "shared prefills changed the tokens"
    ours = min(a[0] for a, _ in rounds)
    peer = min(b[0] for _, b in rounds)
    report(
        f"cpu {n_prompts} prompts x n={n} choices ({prompt_len}-token prompts, {new_tokens} new "
        "tokens): one prefill per prompt vs one per choice",
        ours * 1000,
        peer * 1000,
        "ms",
        higher_is_better=False,
    )
    print(
        f"# rounds (shared / each, ms): {[f'{a[0] * 1000:.0f}/{b[0] * 1000:.0f}' for a, b in rounds]}",
        flush=True,
    )


# ----------------------------------------------------------------------------------- structured
def bpe_tokenizer_json(vocab_size: int, lines: int = 2000) -> str:
    """A byte-level BPE tokenizer.json of up to `vocab_size` tokens, trained on `lines` lines of
    made-up words and JSON (2000 lines give it all 32000)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(60_000)]
    lines = (
        " ".join(rng.choices(words, k=200)) + ' {"key": [1, 2.5, "x"], "ok": true}\n'
        for _ in range(lines)
    )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return str(tokenizer.to_str())


# A schema no request can complete within its 64 tokens (the text field is at least 400
# characters), so that both sides generate the same number of tokens.
LONG_JSON = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "text": {"type": "string", "minLength": 400}},
    "required": ["title", "text"],
}


def bench_structured(root: Path, quick: bool) -> None:
    """The cost of structured outputs: JSON-schema-constrained requests vs the same unconstrained."""
    names, prompts, new_tokens = throughput_workload(quick)
    # A smoke run trains a smaller vocabulary on a few lines (still all 8192 tokens): seconds less.
    vocab, lines = (8192, 50) if quick else (32_000, 2000)
    model = replace(throughput_model(quick), vocab_size=vocab)
    with one_intraop_thread():
        base = build_tiny_model(root / "base-structured", model, seed=0)
        (base / "tokenizer.json").write_text(bpe_tokenizer_json(vocab, lines))
        adapters = {
            name: write_peft_adapter(root / f"s-{name}", model, r=16, seed=100 + int(name[1:]))
            for name in sorted(set(names), key=lambda n: int(n[1:]))
        }
    spec = StructuredOutput.json_schema(LONG_JSON)
    config = EngineConfig(
        max_batch_size=len(prompts),
        adapter_slots=len(adapters),
        max_lora_rank=16,
        max_model_len=256,
        prefix_caching=False,  # every round resends the prompts
    )
    with Engine(base, config, source=PeftDirSource(adapters)) as engine:
        for name in adapters:
            engine.prefetch(name).result()

        def run(structured: StructuredOutput | None) -> float:
            requests = [
                (
                    prompt,
                    name,
                    SamplingParams(
                        max_tokens=new_tokens,
                        temperature=1.0,
                        seed=i,
                        ignore_eos=True,
                        structured=structured,
                    ),
                )
                for i, (prompt, name) in enumerate(zip(prompts, names, strict=True))
            ]
            start = time.perf_counter()
            done = engine.generate_many(requests)
            elapsed = time.perf_counter() - start
            assert all(len(c.token_ids) == new_tokens for c in done)
            if structured is not None:
                assert all(c.text.startswith("{") for c in done), done[0].text
            return len(done) * new_tokens / elapsed

        run(spec)  # warm-up; compiles the schema (kept by the engine, as a server keeps it)
        rounds = [(run(spec), run(None)) for _ in range(1 if quick else 4)]
    report(
        f"cpu {len(prompts)} requests / {len(adapters)} adapters, JSON schema (vocab {vocab}) "
        "vs unconstrained",
        max(r[0] for r in rounds),
        max(r[1] for r in rounds),
        "tok/s",
    )
    print(
        f"# rounds (structured / unconstrained, tok/s): {[f'{a:.0f}/{b:.0f}' for a, b in rounds]}; "
        f"median ratio {statistics.median(a / b for a, b in rounds):.2f}x",
        flush=True,
    )


# -------------------------------------------------------------------------------------- chunked
def bench_chunked(root: Path, quick: bool) -> None:
    """A long prompt arriving while requests decode: their worst gap between two tokens, with
    the prompt prefilled in chunks of --max-num-batched-tokens vs in one step."""
    import asyncio

    decoders, prompt_len, chunk = (2, 48, 16) if quick else (16, 1000, 128)
    settle = 0.2 if quick else 1.0  # seconds of decoding before the prompt arrives
    long_model = replace(throughput_model(quick), max_position_embeddings=1024)
    with one_intraop_thread():
        base = build_tiny_model(root / "base-chunked", long_model, seed=0)
    gen = torch.Generator().manual_seed(2)
    short = [torch.randint(3, 8192, (16,), generator=gen).tolist() for _ in range(decoders)]
    long_prompt = torch.randint(3, 8192, (prompt_len,), generator=gen).tolist()
    decode = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)

    async def run(engine: Engine) -> tuple[float, float]:
        stop = asyncio.Event()
        gaps: list[float] = []

        async def decoder(prompt: list[int]) -> None:
            last = None
            async with engine.submit(prompt, None, decode) as events:
                async for _ in events:
                    now = time.perf_counter()
                    if last is not None and measuring:
                        gaps.append(now - last)
                    last = now
                    if stop.is_set():
                        return

        measuring = False
        tasks = [asyncio.create_task(decoder(p)) for p in short]
        await asyncio.sleep(settle)  # all decoding, in a steady state
        measuring = True
        start = time.perf_counter()
        async with engine.submit(long_prompt, None, SamplingParams(max_tokens=1)) as events:
            async for _ in events:
                pass
        first_token = time.perf_counter() - start
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        return max(gaps), first_token

    results = {}
    for name, budget in (("chunked", chunk), ("whole", 4096)):
        config = EngineConfig(  # no prefix caching: every run must compute the long prompt
            max_batch_size=decoders + 1,
            max_model_len=1024,
            max_num_batched_tokens=budget,
            prefix_caching=False,
        )
        with Engine(base, config) as engine:
            results[name] = min(
                (asyncio.run(run(engine)) for _ in range(1 if quick else 3)), key=lambda r: r[0]
            )
    report(
        f"cpu worst gap between two tokens of {decoders} decoding requests while a "
        f"{prompt_len}-token prompt arrives: prefilled in chunks of {chunk} vs in one step",
        results["chunked"][0] * 1000,
        results["whole"][0] * 1000,
        "ms",
        higher_is_better=False,
    )
    print(
        f"# the long prompt's first token: {results['chunked'][1] * 1000:.0f} ms chunked, "
        f"{results['whole'][1] * 1000:.0f} ms in one step",
        flush=True,
    )


# --------------------------------------------------------------------------------- prefix cache
def bench_prefix(root: Path, quick: bool) -> None:
    """Prompts sharing a prefix, with prefix caching vs without: requests sharing a long system
    prompt per adapter, and an eval harness's loglikelihood batch sharing a few-shot context."""
    n_adapters, per_adapter, system_len, user_len, new_tokens = (
        (2, 1, 48, 8, 2) if quick else (4, 8, 512, 32, 16)
    )
    long_model = replace(throughput_model(quick), max_position_embeddings=1024)
    with one_intraop_thread():
        base = build_tiny_model(root / "base-prefix", long_model, seed=0)
        adapters = {
            f"p{i}": write_peft_adapter(root / f"prefix-p{i}", long_model, r=16, seed=30 + i)
            for i in range(n_adapters)
        }
    gen = torch.Generator().manual_seed(3)
    # One system prompt per adapter (a product's instructions); keys differ by adapter anyway.
    systems = {
        name: torch.randint(3, 8192, (system_len,), generator=gen).tolist() for name in adapters
    }
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    def batch() -> list[tuple[list[int], str | None, SamplingParams]]:
        # Fresh user turns every time: only the system prompts repeat.
        return [
            (
                systems[name] + torch.randint(3, 8192, (user_len,), generator=gen).tolist(),
                name,
                params,
            )
            for _ in range(per_adapter)
            for name in adapters
        ]

    n_requests = n_adapters * per_adapter

    async def run(engine: Engine) -> tuple[float, float, int]:
        """(seconds for the batch, median time to first token, prompt tokens computed)."""
        computed = engine.stats()["prefill_tokens"]
        start = time.perf_counter()
        firsts: list[float] = []

        async def one(prompt: list[int], name: str | None) -> None:
            async with engine.submit(prompt, name, params) as events:
                async for event in events:
                    if event.index == 1:
                        firsts.append(time.perf_counter() - start)

        await asyncio.gather(*(one(prompt, name) for prompt, name, _ in batch()))
        elapsed = time.perf_counter() - start
        return elapsed, statistics.median(firsts), engine.stats()["prefill_tokens"] - computed

    n_questions, n_choices, shots_len, question_len = (1, 2, 32, 4) if quick else (8, 4, 384, 64)
    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)

    def eval_batch(round_index: int) -> list[tuple[list[int], str | None, SamplingParams]]:
        """lm-eval's loglikelihood requests for a multiple-choice task, in one list: a few-shot
        context shared by every question, each question, then each choice (2-5 tokens)."""
        g = torch.Generator().manual_seed(100 + round_index)  # the same for both engines
        shots = torch.randint(3, 8192, (shots_len,), generator=g).tolist()
        out = []
        for _ in range(n_questions):
            question = torch.randint(3, 8192, (question_len,), generator=g).tolist()
            for c in range(n_choices):
                choice = torch.randint(3, 8192, (2 + c,), generator=g).tolist()
                out.append(([*shots, *question, *choice], "p0", scoring))
        return out

    def score(engine: Engine, round_index: int) -> tuple[float, int, list[list[float]]]:
        """(seconds, prompt tokens computed, each request's prompt logprobs)."""
        computed = engine.stats()["prefill_tokens"]
        start = time.perf_counter()
        done = engine.generate_many(eval_batch(round_index))
        elapsed = time.perf_counter() - start
        lps = [[lp.logprob for lp in c.prompt_logprobs or () if lp] for c in done]
        return elapsed, engine.stats()["prefill_tokens"] - computed, lps

    results: dict[bool, list[tuple[float, float, int]]] = {}
    scored: dict[bool, list[tuple[float, int, list[list[float]]]]] = {}
    for caching in (True, False):
        config = EngineConfig(
            max_batch_size=n_requests,
            adapter_slots=n_adapters,
            max_lora_rank=16,
            max_model_len=1024,
            prefix_caching=caching,
        )
        with Engine(base, config, source=PeftDirSource(adapters)) as engine:
            for name in adapters:
                engine.prefetch(name).result()
            # Warm-up; with caching it also leaves each system prompt cached, as a server that
            # has answered the product's earlier requests holds it.
            asyncio.run(run(engine))
            results[caching] = [asyncio.run(run(engine)) for _ in range(1 if quick else 4)]
            # Each round its own few-shot context: what is shared is within the one batch.
            scored[caching] = [score(engine, i) for i in range(1 if quick else 3)]
    for a, b in zip(scored[True], scored[False], strict=True):
        for x, y in zip(a[2], b[2], strict=True):
            assert max(abs(u - v) for u, v in zip(x, y, strict=True)) < 1e-3
    ours, peer = (min(r[0] for r in results[c]) for c in (True, False))
    report(
        f"cpu {n_requests} requests over {n_adapters} adapters, each a {system_len}-token system "
        f"prompt + {user_len} new tokens, {new_tokens} generated: prefix caching vs without",
        ours * 1000,
        peer * 1000,
        "ms",
        higher_is_better=False,
    )
    ttft = [min(r[1] for r in results[c]) * 1000 for c in (True, False)]
    print(
        f"# median time to first token: {ttft[0]:.0f} ms with caching, {ttft[1]:.0f} ms without; "
        f"prompt tokens computed per batch: {results[True][0][2]} with, {results[False][0][2]} "
        f"without; rounds (ms, with/without): {_rounds_ms(results[True], results[False])}",
        flush=True,
    )
    ours, peer = (min(r[0] for r in scored[c]) for c in (True, False))
    report(
        f"cpu loglikelihood batch ({n_questions} questions x {n_choices} choices, a "
        f"{shots_len}-token few-shot context + {question_len}-token questions, prompt logprobs, "
        "one list as lm-eval sends it): prefix caching vs without",
        ours * 1000,
        peer * 1000,
        "ms",
        higher_is_better=False,
    )
    print(
        f"# prompt tokens computed: {scored[True][0][1]} with caching, {scored[False][0][1]} "
        f"without; prompt logprobs agree within 1e-3; rounds (ms, with/without): "
        f"{_rounds_ms(scored[True], scored[False])}",
        flush=True,
    )


def _rounds_ms(ours: list[tuple[Any, ...]], peer: list[tuple[Any, ...]]) -> list[str]:
    """Each round's 'ours/peer' milliseconds, from results whose first item is seconds."""
    return [f"{a[0] * 1000:.0f}/{b[0] * 1000:.0f}" for a, b in zip(ours, peer, strict=True)]


# -------------------------------------------------------------------------------------- hot swap
HOTSWAP_MODEL = TinyConfig(
    arch="llama",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    init_std=0.02,
)


def _merge_into(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """The merged checkpoint users ship today: W += scale * B @ A for every adapted linear."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(str(base_dir / "model.safetensors"))
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    for name, a in lora.items():
        if ".lora_A." not in name:
            continue
        b = lora[name.replace(".lora_A.", ".lora_B.")]
        target = name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
        weights[target] += scale * (b.float() @ a.float()).to(weights[target].dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base_dir / extra, out_dir / extra)
    return out_dir


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def drop_page_cache(*roots: Path) -> None:
    """Evict every file under `roots` from the OS page cache, so that its next read comes from disk.

    posix_fadvise(DONTNEED) drops a file's clean, unmapped pages, without privileges; the
    fsync first makes recently written pages clean. Pages a live memory map still holds stay.
    """
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def bench_hotswap(root: Path, quick: bool) -> None:
    """Revision requested -> slot ready, cold and warm, vs a full merged-checkpoint load."""
    config = (
        HOTSWAP_MODEL
        if not quick
        else replace(QUICK_MODEL, vocab_size=512, max_position_embeddings=256)
    )
    t0 = time.perf_counter()
    base = build_tiny_model(root / "base-0.4b", config, seed=0)
    # One revision to warm up on, then 8 cold loads: the machine is noisy, the median needs them.
    # (A smoke run's 4 are the least the warm loads' r0..r3 need.)
    n_cold = 4 if quick else 8
    revisions = {
        f"r{i}": write_peft_adapter(root / f"r{i}", config, r=16, seed=200 + i)
        for i in range(n_cold + 1)
    }
    merged = _merge_into(base, revisions["r0"], root / "merged")
    print(
        f"# built base, {n_cold + 1} revisions and a merged checkpoint in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )

    # The revisions live where users keep them: committed to a mintvcs repository on disk.
    repo = porcelain.init(root / "repo", str(base), install_hooks=False)
    commits = {
        name: porcelain.commit(
            repo, f"revision {name}", source=path, verify=False, show_progress=False
        ).commit
        for name, path in revisions.items()
    }
    engine_config = EngineConfig(
        adapter_slots=2, max_lora_rank=16, max_model_len=256, max_batch_size=4
    )
    with Engine(base, engine_config, source=StoreSource(repo)) as engine:
        params = engine.model.num_parameters
        adapter_mb = sum(p.stat().st_size for p in revisions["r0"].glob("*.safetensors")) / 1e6
        # The first load pays one-off costs (threads, allocator).
        engine.prefetch(commits[f"r{n_cold}"]).result()

        def swap(name: str) -> float:
            return _time(lambda: engine.prefetch(commits[name]).result())

        # Cold: not in the host cache; decoded from the store, whose files were just written, so
        # the OS page cache holds them.
        cold = [swap(f"r{i}") for i in range(n_cold)]
        # Warm: with two slots, each of r0..r3 was evicted since its last use but stays in the host cache.
        warm = [swap(n) for _ in range(3) for n in ("r0", "r1", "r2", "r3")]
        stats = engine.stats()
    chain_cached, chain_plain, depths = _hotswap_chain(
        root, base, repo, revisions["r0"], engine_config, cycles=1 if quick else 2
    )
    full = min(_time(lambda: Model.from_dir(merged)) for _ in range(2))
    # From disk: engines without host cache, so that every load decodes from the store, load
    # r0..r7 three times over: with the files in the page cache, then with them dropped from
    # it, then cached again. Each round is a fresh engine (its own Repository) that has read
    # only r8 when the drop comes: the pages of a pack a live memory map has touched stay in
    # the page cache whatever posix_fadvise says. The merged checkpoint is dropped before each
    # of its loads.
    repo.close()
    no_host_cache = replace(engine_config, host_cache_bytes=0)
    rounds = []
    for from_disk in (False, True, False):
        with Engine(base, no_host_cache, source=StoreSource(repo.git_dir)) as engine:
            engine.prefetch(commits[f"r{n_cold}"]).result()
            if from_disk:
                drop_page_cache(repo.git_dir / "objects")
            rounds.append(
                [
                    _time(lambda i=i: engine.prefetch(commits[f"r{i}"]).result())
                    for i in range(n_cold)
                ]
            )
    disk, cached = rounds[1], rounds[0] + rounds[2]

    def merged_from_disk() -> float:
        drop_page_cache(merged)
        return _time(lambda: Model.from_dir(merged))

    full_disk = min(merged_from_disk() for _ in range(2))
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    print(
        f"# base {params / 1e9:.2f}B parameters fp32, revision {adapter_mb:.1f} MB on disk, "
        f"cold loads {[round(c * 1e3, 1) for c in cold]} ms (range {min(cold) * 1e3:.0f}-"
        f"{max(cold) * 1e3:.0f}), host hits {stats['host_hits']}",
        flush=True,
    )
    report(
        "hot swap cold (store -> slot) vs full merged reload",
        cold_s * 1e3,
        full * 1e3,
        "ms",
        False,
    )
    print(
        f"# from disk (page cache dropped): cold loads {[round(c * 1e3, 1) for c in disk]} ms "
        f"(the same engine from the page cache, before and after: median "
        f"{statistics.median(cached) * 1e3:.1f} ms); merged reloads best of 2 "
        f"{full_disk * 1e3:.0f} ms",
        flush=True,
    )
    report(
        "hot swap cold from disk (store -> slot) vs full merged reload from disk",
        statistics.median(disk) * 1e3,
        full_disk * 1e3,
        "ms",
        False,
    )
    report(
        "hot swap warm (host cache -> slot) vs full merged reload",
        warm_s * 1e3,
        full * 1e3,
        "ms",
        False,
    )
    print(
        f"# training-run chain (XOR depths {depths}): cold loads in commit order, with the plane "
        f"cache {[round(c * 1e3, 1) for c in chain_cached]} ms, without "
        f"{[round(c * 1e3, 1) for c in chain_plain]} ms",
        flush=True,
    )
    steady = len(depths) // 2  # the second cycle of depths
    report(
        "hot swap cold, next revision of a training run (store -> slot) vs full merged reload",
        statistics.median(chain_cached[steady:]) * 1e3,
        full * 1e3,
        "ms",
        False,
    )
    report(
        "hot swap cold, next revision of a training run: plane cache vs decoding every chain",
        statistics.median(chain_cached[steady:]) * 1e3,
        statistics.median(chain_plain[steady:]) * 1e3,
        "ms",
        False,
    )


def _hotswap_chain(
    root: Path, base: Path, repo: Any, first: Path, engine_config: EngineConfig, cycles: int
) -> tuple[list[float], list[float], list[int]]:
    """Cold loads of a training run's revisions (each a nudge of the last, so XOR links up to
    MAX_CHAIN deep), in commit order as a server following the branch sees them: with the
    store's plane cache (the default) and without it, over `cycles` cycles of chain depths:
    the first fills the cache (fresh memory, page faults), later ones are the steady state that
    a long-running server sees. Returns both timings and the depths."""
    import shutil

    from safetensors.torch import load_file, save_file

    from mintvcs.codec import MAX_CHAIN

    work = root / "run"
    shutil.copytree(first, work, dirs_exist_ok=True)
    porcelain.branch_create(repo, "run", "HEAD")
    gen = torch.Generator().manual_seed(7)
    commits, depths = [], []
    for step in range(cycles * (MAX_CHAIN + 1) + 1):
        if step:
            weights = load_file(str(work / "adapter_model.safetensors"))
            nudged = {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}
            save_file(nudged, str(work / "adapter_model.safetensors"), metadata={"format": "pt"})
        result = porcelain.commit(
            repo, f"step {step}", source=work, branch="run", verify=False, show_progress=False
        )
        commits.append(result.commit)
        depths.append(max(r.depth for r in repo.read_revision(result.commit).manifest.tensors))
    timings = []
    for cache_bytes in (None, 0):  # None: the default bound
        source = StoreSource(repo.git_dir, plane_cache_bytes=cache_bytes)
        with Engine(base, engine_config, source=source) as engine:
            engine.prefetch(commits[0]).result()  # the first one pays one-off costs
            timings.append([_time(lambda c=c: engine.prefetch(c).result()) for c in commits[1:]])
    return timings[0], timings[1], depths[1:]


# ------------------------------------------------------------------------------------------ cuda
class RandomSource:
    """Random all-linear revisions made in memory: the GPU benchmark ships no files.

    One set of random factors is drawn, on first use; each name gets that set with its layers
    rotated and B scaled by amounts taken from the name's CRC-32. So revisions differ from one
    another and from run to run stay the same, and a load draws no random numbers (drawing
    Llama-3-8B-sized factors afresh took ~0.9 s a revision, a minute for the benchmark's 64).
    """

    def __init__(self, config: ModelConfig, rank: int = 16, dtype: torch.dtype = torch.float32):
        self.config = config
        self.rank = rank
        self.dtype = dtype  # the engine's: no conversion when a revision is prepared
        self._layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def resolve(self, spec: str) -> str:
        """Names are ids."""
        return spec

    def _factors(self) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        if not self._layers:
            gen = torch.Generator().manual_seed(0)
            for _ in range(self.config.num_hidden_layers):
                layer = {}
                for module in LORA_MODULES:
                    out_f, in_f = self.config.linear_shape(module)
                    a = torch.randn(self.rank, in_f, generator=gen) / in_f**0.5
                    b = torch.randn(out_f, self.rank, generator=gen) * 0.01
                    layer[module] = (a.to(self.dtype), b.to(self.dtype))
                self._layers.append(layer)
        return self._layers

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        """Factors for every linear, the same for the same name in every process."""
        layers = self._factors()
        code = zlib.crc32(revision.encode())  # hash() of a str changes with each process
        shift = code % len(layers)
        scale = 0.5 + (code >> 16) % 1024 / 1024  # in [0.5, 1.5)
        tensors = {}
        for layer in range(len(layers)):
            for module, (a, b) in layers[(layer + shift) % len(layers)].items():
                part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{part}.{module}"
                # A is shared between revisions: the engine copies factors and never writes them.
                tensors[f"{prefix}.lora_A.weight"] = a
                tensors[f"{prefix}.lora_B.weight"] = b * scale
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": 2 * self.rank}
        return AdapterWeights(revision, config, tensors)


def random_model(
    config: ModelConfig, device: torch.device, dtype: torch.dtype, max_len: int
) -> Model:
    """A random base of `config`, built directly on `device`."""
    std = 0.02
    raw: dict[str, torch.Tensor] = {}

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * std

    h = config.hidden_size
    raw["model.embed_tokens.weight"] = normal(config.vocab_size, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}"
        raw[f"{p}.input_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
        raw[f"{p}.post_attention_layernorm.weight"] = torch.ones(h, device=device, dtype=dtype)
        for module in LORA_MODULES:
            out_f, in_f = config.linear_shape(module)
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            raw[f"{p}.{part}.{module}.weight"] = normal(out_f, in_f)
    raw["model.norm.weight"] = torch.ones(h, device=device, dtype=dtype)
    raw["lm_head.weight"] = normal(config.vocab_size, h)
    return Model.from_state_dict(config, raw, max_len=max_len)


LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "eos_token_id": 128001,
}


def bench_cuda(quick: bool, shape: dict[str, Any] | None = None) -> None:
    """Throughput with 1, 8, 64 distinct adapters vs base-only on a Llama-3-8B-shaped bf16 base."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = ModelConfig.from_dict(shape or LLAMA3_8B)
    n_requests, prompt_len, new_tokens = (64, 128, 128) if not quick else (8, 16, 8)
    start = time.perf_counter()

    def progress(what: str) -> None:
        # Each step's time, as it happens: a run cut off by its time limit still says where.
        print(f"# {time.perf_counter() - start:6.1f} s  {what}", flush=True)

    model = random_model(config, device, dtype, max_len=prompt_len + new_tokens + 8)
    progress(f"random {config.num_hidden_layers}-layer base built on {device.type}")
    source = RandomSource(config, dtype=dtype)
    engine_config = EngineConfig(  # no prefix caching: every run sends the same prompts
        max_batch_size=n_requests,
        adapter_slots=64,
        max_lora_rank=16,
        max_num_batched_tokens=16384,
        prefix_caching=False,
    )
    with Engine(
        model, engine_config, source=source, base_fingerprint=None, start=device.type == "cuda"
    ) as engine:
        if device.type == "cpu":
            # The CPU smoke runs the graphs' fixed-shape steps without capturing them, so that
            # every line of this section has run before a GPU session spends minutes on it.
            engine.kv = model.new_kv_cache(n_requests, model.max_len, scratch=True)
            engine.scheduler = Scheduler(
                model,
                engine.kv,
                engine.residency,
                max_num_batched_tokens=engine_config.max_num_batched_tokens,
                graphs=DecodeGraphs(model, engine.kv, engine.pools),
                prefix_caching=False,
            )
            engine.start()
        for i in range(64):
            engine.prefetch(f"g{i}").result()
            if i in (0, 15, 31, 63):
                progress(f"{i + 1} adapters resident")
        gen = torch.Generator().manual_seed(0)
        prompts = [
            torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist()
            for _ in range(n_requests)
        ]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

        def run(distinct: int) -> float:
            revisions = [None if distinct == 0 else f"g{i % distinct}" for i in range(n_requests)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate_many(list(zip(prompts, revisions, [params] * n_requests, strict=True)))
            return n_requests * new_tokens / (time.perf_counter() - start)

        graphs = engine.scheduler.graphs
        run(0)  # warm-up (kernel compilation, allocator, graph capture)
        run(8)
        # Named after the warm-up: a capture that failed there left the engine eager for good.
        mode = (
            "eager"
            if graphs is None
            else "eager: CUDA graph capture failed"
            if graphs.failure is not None
            else "CUDA graphs"
            if graphs.capture
            else "fixed shapes"
        )
        progress(f"warm-up runs done ({mode})")
        base = max(run(0) for _ in range(2))
        for distinct in (1, 8, 64):
            tps = max(run(distinct) for _ in range(2))
            report(
                f"{device.type} {n_requests} requests, {distinct} distinct adapters vs base-only"
                f" ({mode})",
                tps,
                base,
                "tok/s",
            )
        if graphs is not None:
            progress(
                f"{graphs.captured} CUDA graphs captured in {graphs.capture_seconds:.1f} s"
                + (f"; capture FAILED, runs were eager: {graphs.failure}" if graphs.failure else "")
            )
            # The same engine with its decode steps run eagerly (the scheduler is idle between runs).
            engine.scheduler.graphs = None
            eager = {distinct: max(run(distinct) for _ in range(2)) for distinct in (0, 8)}
            engine.scheduler.graphs = graphs
            if graphs.failure is None:  # otherwise both sides ran eagerly
                report(f"{device.type} base-only, CUDA graphs vs eager", base, eager[0], "tok/s")
            report(
                f"{device.type} {n_requests} requests, 8 distinct adapters vs base-only (eager)",
                eager[8],
                eager[0],
                "tok/s",
            )
        # The engine is idle now: its KV slots and adapter slots are free to drive directly.
        for distinct in (0, 8):
            profile_decode_step(engine, n_requests, prompt_len, distinct)
            if graphs is not None and graphs.failure is None:
                profile_decode_step(engine, n_requests, prompt_len, distinct, graphs=True)


def profile_decode_step(
    engine: Engine, n_requests: int, position: int, distinct: int, *, graphs: bool = False
) -> None:
    """Where one decode step's time goes: the wall time against the GPU's kernel time.

    Kernel time well under the wall time means the step is bound by launching (Python and the
    CUDA driver), which CUDA graphs remove; near it, by the kernels themselves. graphs=True
    replays the engine's captured step instead of the eager forward.
    """
    from torch.profiler import ProfilerActivity, profile

    model, pools = engine.model, engine.pools
    slots = [] if distinct == 0 else [engine.residency.slot_of(f"g{i}") for i in range(distinct)]
    lora_slots = [-1 if not slots else slots[i % distinct] for i in range(n_requests)]
    first = engine.kv.first_slot  # KV slot 0 is the graphs' scratch slot when they are on
    decodes = [
        (7, position, first + i, s if s is not None else -1) for i, s in enumerate(lora_slots)
    ]
    batch = StepBatch.build(decodes, [], model.device)
    used = {s for s in lora_slots if s >= 0}
    cuda = model.device.type == "cuda"

    decode_graphs = engine.scheduler.graphs

    def step() -> None:
        replayed = graphs and decode_graphs is not None
        if replayed and decode_graphs.run(decodes, lora=bool(used)) is not None:
            return
        lora = pools.batch(batch.token_lora_slots, used, engine.config.kernel_backend)
        model.forward(batch, engine.kv, lora)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    steps = 5
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6 / steps
    lora_s = (
        sum(e.self_device_time_total for e in events if "shrink" in e.key or "expand" in e.key)
        / 1e6
        / steps
    )
    launches = sum(e.count for e in events) / steps
    print(
        f"# decode step{' (CUDA graph)' if graphs else ''}, {n_requests} sequences at position "
        f"{position}, {distinct} distinct adapters: wall {wall * 1e3:.2f} ms, GPU kernels {kernel_s * 1e3:.2f} ms "
        f"({kernel_s / wall:.0%} busy), LoRA kernels {lora_s * 1e3:.2f} ms, "
        f"{launches:.0f} kernels per step",
        flush=True,
    )
    # The kernels that take the time: which attention backend ran, GEMMs against the rest.
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:10]:
        share = e.self_device_time_total / 1e6 / steps / kernel_s if kernel_s else 0.0
        print(
            f"#   {e.self_device_time_total / 1e3 / steps:8.3f} ms {share:4.0%} "
            f"x{e.count / steps:<5.0f} {e.key[:100]}",
            flush=True,
        )


def main() -> None:
    """Run the selected sections."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        choices=["throughput", "choices", "chunked", "prefix", "structured", "hotswap", "cuda"],
        action="append",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, to check the script runs"
    )
    parser.add_argument(
        "--cuda-smoke", action="store_true", help="run the GPU section's code on CPU, tiny shape"
    )
    parser.add_argument("--peft-run", type=Path, help=argparse.SUPPRESS)  # one PEFT round
    args = parser.parse_args()
    if args.peft_run is not None:
        print(peft_throughput(args.peft_run, args.quick))
        return
    sections = args.only or [
        "throughput",
        "choices",
        "chunked",
        "prefix",
        "structured",
        "hotswap",
        "cuda",
    ]
    with tempfile.TemporaryDirectory(prefix="mintvcs-bench-") as tmp:
        root = Path(tmp)
        if "throughput" in sections:
            bench_throughput(root, args.quick)
        if "choices" in sections:
            bench_choices(root, args.quick)
        if "chunked" in sections:
            bench_chunked(root, args.quick)
        if "prefix" in sections:
            bench_prefix(root, args.quick)
        if "structured" in sections:
            bench_structured(root, args.quick)
        if "hotswap" in sections:
            bench_hotswap(root, args.quick)
        if "cuda" in sections:
            if args.cuda_smoke:
                tiny = {**LLAMA3_8B, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128}
                bench_cuda(
                    True,
                    {
                        **tiny,
                        "num_hidden_layers": 2,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 2,
                    },
                )
            elif torch.cuda.is_available():
                bench_cuda(args.quick)
            else:
                print("cuda: not measured (no CUDA device here)", flush=True)


if __name__ == "__main__":
    main()
