"""Fixed-shape decode steps (serve/graphs.py) against the eager forward; CUDA graph capture on a GPU."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.graphs import DecodeGraphs, batch_buckets, length_buckets
from mintvcs.serve.model import StepBatch
from mintvcs.serve.scheduler import Scheduler
from tests.serve.conftest import ZOO
from tests.serve.test_engine import _prompt

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def test_buckets_cover_every_size_once() -> None:
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert length_buckets(264) == [64, 128, 256, 264]
    assert length_buckets(40) == [40]
    assert length_buckets(128) == [64, 128]


@pytest.fixture(scope="module")
def idle_engine(tiny_base: Path, zoo: dict[str, Path]) -> Iterator[Engine]:
    """An engine whose step loop never starts: the test drives its model, KV cache and pools."""
    config = EngineConfig(max_batch_size=8, adapter_slots=4, max_model_len=96)
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as eng:
        yield eng


def test_static_decode_step_equals_the_eager_forward(idle_engine: Engine) -> None:
    engine = idle_engine
    model, pools = engine.model, engine.pools
    slots = {name: engine.prefetch(name).result() for name in ("qv-r8", "all-r16", "mlp-r2")}
    kv = model.new_kv_cache(8, 96, scratch=True)
    # Five sequences in scattered KV slots, different lengths and adapters (one base-only).
    seqs = [  # KV slot 0 is the scratch slot
        (3, _prompt(1, 5), slots["qv-r8"]),
        (1, _prompt(2, 17), slots["all-r16"]),
        (6, _prompt(3, 9), -1),
        (7, _prompt(4, 70), slots["mlp-r2"]),
        (4, _prompt(5, 2), slots["all-r16"]),
    ]
    prefill = StepBatch.build([], [(p, k, s) for k, p, s in seqs], model.device)
    lora = pools.batch(prefill.token_lora_slots, {s for *_, s in seqs if s >= 0})
    model.forward(prefill, kv, lora)
    decodes = [(7 + i, len(p), k, s) for i, (k, p, s) in enumerate(seqs)]
    step = StepBatch.build(decodes, [], model.device)
    lora = pools.batch(step.token_lora_slots, {s for *_, s in seqs if s >= 0})
    eager = model.forward(step, kv, lora).clone()
    keys = [k.clone() for k in kv.keys]

    graphs = DecodeGraphs(model, kv, pools, capture=False)
    assert graphs.plan(decodes) == (8, 96)  # KV slots up to 7: 8; lengths up to 71: max_len
    static = graphs.run(decodes, lora=True)
    assert static is not None and static.shape == eager.shape
    torch.testing.assert_close(static, eager, rtol=1e-5, atol=1e-5)
    assert static.argmax(-1).tolist() == eager.argmax(-1).tolist()
    # It rewrote the same keys for the real rows; the padding wrote only to the scratch slot.
    for before, after in zip(keys, kv.keys, strict=True):
        torch.testing.assert_close(after[1:], before[1:], rtol=1e-5, atol=1e-5)
    # Base-only rows of the same step without adapters: the base forward.
    base = model.forward(StepBatch.build(decodes, [], model.device), kv, None)
    static_base = graphs.run(decodes, lora=False)
    assert static_base is not None
    torch.testing.assert_close(static_base, base, rtol=1e-5, atol=1e-5)
    assert graphs.steps == 2


def test_steps_are_planned_by_batch_highest_slot_and_length(idle_engine: Engine) -> None:
    model = idle_engine.model
    graphs = DecodeGraphs(model, model.new_kv_cache(12, 100, scratch=True), None)
    assert graphs.plan([(1, 0, 1, -1)]) == (1, 64)
    assert graphs.plan([(1, 0, 3, -1)]) == (4, 64)  # one decode, but KV slots 0..3 are read
    assert graphs.plan([(1, 70, s, -1) for s in (1, 2, 9)]) == (12, 100)
    assert graphs.plan([(1, 5, s, -1) for s in range(1, 13)]) == (12, 64)
    assert graphs.plan([(1, 100, 1, -1)]) is None  # past max_len: eager (and refused there)
    assert graphs.plan([]) is None
    assert graphs.run([(1, 100, 1, -1)], lora=False) is None
    with pytest.raises(ValueError, match="scratch"):
        DecodeGraphs(model, model.new_kv_cache(4, 32), None)


def test_the_scratch_slot_is_never_handed_out(idle_engine: Engine) -> None:
    kv = idle_engine.model.new_kv_cache(3, 16, scratch=True)
    assert kv.keys[0].shape[0] == 4 and kv.scratch_slot == 0
    assert [kv.allocate() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(ValueError, match="not allocated"):
        kv.free(0)
    kv.free(2)
    assert kv.allocate() == 2


def _eager_then_fixed_shape(
    tiny_base: Path,
    zoo: dict[str, Path],
    reqs: list[tuple[list[int], str | None, SamplingParams]],
    config: EngineConfig,
    *,
    capture: bool,
) -> tuple[list[list[int]], list[list[int]], DecodeGraphs, dict[str, object]]:
    """Greedy tokens of an eager engine, then of one wired to DecodeGraphs as Engine does on CUDA."""
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eager:
        expected = [c.token_ids for c in eager.generate_many(reqs, timeout=120)]
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as engine:
        engine.kv = engine.model.new_kv_cache(
            config.max_batch_size, config.max_model_len, scratch=True
        )
        graphs = DecodeGraphs(engine.model, engine.kv, engine.pools, capture=capture)
        engine.scheduler = Scheduler(engine.model, engine.kv, engine.residency, graphs=graphs)
        engine.start()
        got = [c.token_ids for c in engine.generate_many(reqs, timeout=120)]
        stats = engine.stats()
    return expected, got, graphs, stats


def test_an_engine_on_static_steps_generates_what_the_eager_one_does(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    reqs = [(_prompt(50 + i, 3 + 7 * i % 30), name, GREEDY) for i, name in enumerate([*ZOO, None])]
    config = EngineConfig(max_batch_size=12, adapter_slots=8, max_model_len=128)
    expected, got, graphs, _ = _eager_then_fixed_shape(tiny_base, zoo, reqs, config, capture=False)
    assert got == expected
    assert graphs.steps >= 9  # every step after the prefills was a fixed-shape one


@pytest.mark.skipif(torch.cuda.is_available(), reason="capture fails only without CUDA")
def test_a_failed_capture_turns_graphs_off_and_the_engine_decodes_eagerly(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    reqs = [(_prompt(60 + i, 4 + i), name, GREEDY) for i, name in enumerate(["qv-r8", None])]
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=64)
    # capture=True on a machine without CUDA: the first capture fails for real.
    expected, got, graphs, stats = _eager_then_fixed_shape(
        tiny_base, zoo, reqs, config, capture=True
    )
    assert got == expected and stats["requests_failed"] == 0
    assert graphs.failure is not None and graphs.captured == 0
    assert graphs.plan([(1, 0, 1, -1)]) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_engine_equals_the_eager_engine(tiny_base: Path, zoo: dict[str, Path]) -> None:
    reqs = [(_prompt(80 + i, 2 + 5 * i % 40), name, GREEDY) for i, name in enumerate([*ZOO, None])]
    results = {}
    for use_graphs in (False, True):
        # Four slots for eight adapters: slots are evicted and reloaded under captured graphs,
        # which must read the new factors in place.
        config = EngineConfig(
            device="cuda",
            dtype="float32",
            max_batch_size=12,
            adapter_slots=4,
            max_model_len=128,
            cuda_graphs=use_graphs,
        )
        with Engine(tiny_base, config, source=PeftDirSource(zoo)) as engine:
            results[use_graphs] = [
                [c.token_ids for c in engine.generate_many(reqs, timeout=300)],
                [c.token_ids for c in engine.generate_many(reqs[::-1], timeout=300)][::-1],
            ]
            graphs = engine.scheduler.graphs
            if use_graphs:
                assert graphs is not None and graphs.captured >= 1 and graphs.steps >= 9
                assert engine.stats()["evictions"] >= 4
            else:
                assert graphs is None
    assert results[True] == results[False]
    assert results[False][0] == results[False][1]
