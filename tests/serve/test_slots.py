"""Host copies staged in the slots' memory order: what a swap writes, and what the cold path refuses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mintvcs.serve import AdapterRefused, Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.adapters import AdapterWeights, HostAdapter, prepare_adapter
from mintvcs.serve.loader import read_config
from mintvcs.serve.slots import AdapterPools, HostCache

CPU = torch.device("cpu")


def _host(directory: Path, base: Path, max_rank: int = 16) -> HostAdapter:
    weights = PeftDirSource({"x": directory}).load("x")
    return prepare_adapter(weights, read_config(base), max_rank=max_rank)


def _pools(base: Path, *, packed: bool, slots: int = 2) -> AdapterPools:
    return AdapterPools(
        read_config(base), slots, 16, dtype=torch.float32, device=CPU, packed=packed
    )


def _slot(pools: AdapterPools, slot: int) -> list[torch.Tensor]:
    assert pools.packed is not None
    return [t[slot].clone() for layer in pools.packed for p in layer.values() for t in (p.a, *p.b)]


# Writes in this order cover: a larger rank then a smaller one (stale columns must go), a group
# the next revision does not adapt (its slot part must be zeroed), partial groups, rank 1.
ORDER = ("all-r16", "mlp-r2", "qv-r8", "all-r4-rslora", "qd-r1", "o-r6", "kv-r12", "all-r16")


def test_a_staged_image_writes_what_pack_slot_writes(tiny_base: Path, zoo: dict[str, Path]) -> None:
    """The image path (whole copies) leaves each slot exactly as the per-module pack_slot path does."""
    staged, direct = _pools(tiny_base, packed=True), _pools(tiny_base, packed=True)
    for step, name in enumerate(ORDER):
        host = _host(zoo[name], tiny_base)
        image = staged.stage(host)
        assert image.packed is not None and image.buffer is not None
        slot = step % 2
        staged.write(slot, image)
        direct.write(slot, host)  # no image: kernels' pack_slot, factor by factor
        for got, want in zip(_slot(staged, slot), _slot(direct, slot), strict=True):
            assert torch.equal(got, want), name
        assert torch.equal(staged.scales, direct.scales)
        assert torch.equal(staged.ranks, direct.ranks)


def test_staged_weights_are_views_of_one_buffer_sized_by_the_revision(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    pools = _pools(tiny_base, packed=True)
    full = pools.stage(_host(zoo["all-r16"], tiny_base))
    small_host = _host(zoo["mlp-r2"], tiny_base)
    small = pools.stage(small_host)
    for key, (a, b) in small_host.weights.items():
        sa, sb = small.weights[key]
        assert torch.equal(sa, a) and torch.equal(sb, b)
        assert sa.untyped_storage().data_ptr() == small.buffer.untyped_storage().data_ptr()
    assert small.nbytes == pools.image_numel(small_host) * 4
    # Rank 2 of 16 on three of seven modules: the host cache holds far less than a slot.
    assert small.nbytes * 10 < full.nbytes
    assert full.nbytes == sum(a.numel() + b.numel() for a, b in full.weights.values()) * 4


def test_stage_takes_a_given_zeroed_image_and_checks_its_size(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    pools = _pools(tiny_base, packed=True)
    host = _host(zoo["qv-r8"], tiny_base)
    image = pools.new_image(pools.image_numel(host))
    assert pools.stage(host, image).buffer is image
    with pytest.raises(ValueError, match="elements"):
        pools.stage(host, pools.new_image(pools.image_numel(host) + 1))


def test_unpacked_pools_on_cpu_keep_the_host_adapter(tiny_base: Path, zoo: dict[str, Path]) -> None:
    pools = _pools(tiny_base, packed=False)
    host = _host(zoo["qv-r8"], tiny_base)
    assert pools.stage(host) is host
    assert pools.image_numel(host) == 0


def test_unpacked_slot_reuse_reads_only_the_new_occupant(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    """The per-module pools (CUDA's layout) reused over ORDER: what kernels read of the slot (every
    module's B up to the slot rank) equals a fresh pool's, so nothing of an earlier occupant stays."""
    reused = _pools(tiny_base, packed=False)
    for name in ORDER:
        host = _host(zoo[name], tiny_base)
        reused.write(0, host)
        fresh = _pools(tiny_base, packed=False)
        fresh.write(0, host)
        r = int(reused.ranks[0])
        assert r == int(fresh.ranks[0]) and torch.equal(reused.scales, fresh.scales)
        for layer, modules in enumerate(fresh.b):
            for module, b in modules.items():
                got = reused.b[layer][module][0, :, :r]
                assert torch.equal(got, b[0, :, :r]), (name, layer, module)


@pytest.mark.parametrize("packed", [True, False])
def test_a_released_slot_reads_as_rank_zero(
    tiny_base: Path, zoo: dict[str, Path], packed: bool
) -> None:
    # Kernels skip a rank-0 slot: a token still mapped to a released slot reads none of the
    # stale factors, while the other slot keeps its own.
    pools = _pools(tiny_base, packed=packed)
    pools.write(0, _host(zoo["qv-r8"], tiny_base))
    pools.write(1, _host(zoo["all-r16"], tiny_base))
    pools.release(0)
    assert pools.ranks.tolist() == [0, 16]
    assert pools.slot_modules[0] == frozenset() and pools.slot_modules[1]


def test_host_cache_evicts_the_least_recently_used_and_counts_its_bytes(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    config = read_config(tiny_base)
    source = PeftDirSource(zoo)
    a, b, c = (
        prepare_adapter(source.load(n), config, max_rank=16) for n in ("qv-r8", "o-r6", "mlp-r2")
    )
    cache = HostCache(max(a.nbytes + b.nbytes, a.nbytes + c.nbytes))  # two fit, three do not
    cache.put(a)
    cache.put(b)
    assert cache.get("qv-r8") is a  # a is now the most recently used: b goes first
    cache.put(c)
    assert cache.revisions() == ["qv-r8", "mlp-r2"] and cache.get("o-r6") is None
    assert cache.nbytes == a.nbytes + c.nbytes and cache.evictions == 1


def _poisoned(directory: Path, value: float, tensor: str = "lora_B") -> AdapterWeights:
    weights = PeftDirSource({"x": directory}).load("x")
    name = sorted(n for n in weights.tensors if tensor in n and "layers.1." in n)[0]
    weights.tensors[name].view(-1)[3] = value
    return weights


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_factors_are_refused_by_name(
    tiny_base: Path, zoo: dict[str, Path], value: float
) -> None:
    config = read_config(tiny_base)
    weights = _poisoned(zoo["all-r16"], value)
    with pytest.raises(AdapterRefused, match=r"layer 1 \w+ lora_B holds NaN or Inf") as info:
        prepare_adapter(weights, config, max_rank=16)
    assert info.value.reason == "non_finite"
    # The engine's path: no check in prepare, one over the staged image.
    host = prepare_adapter(weights, config, max_rank=16, check_finite=False)
    staged = _pools(tiny_base, packed=True).stage(host)
    with pytest.raises(AdapterRefused, match="non_finite"):
        staged.check_finite()


def test_large_finite_factors_whose_sum_overflows_are_served(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    """The one-reduction check falls back to an exact one when the sum itself overflows."""
    weights = PeftDirSource({"x": zoo["all-r16"]}).load("x")
    for name in [n for n in weights.tensors if "lora_A" in n][:2]:
        weights.tensors[name].view(-1)[0] = 3e38
    host = prepare_adapter(weights, read_config(tiny_base), max_rank=16, check_finite=False)
    staged = _pools(tiny_base, packed=True).stage(host)
    assert not math.isfinite(float(staged.buffer.sum()))
    staged.check_finite()


class _PoisonSource(PeftDirSource):
    """A source whose revision 'bad' has one NaN (as a store without the commit hook could hold)."""

    def load(self, revision: str, *, max_bytes: int | None = None) -> AdapterWeights:
        if revision == "bad":
            return _poisoned(self.directories["ok"], math.nan, "lora_A")
        return super().load(revision)


PARAMS = SamplingParams(max_tokens=4, temperature=0.0)


def _poisoned_engine(tiny_base: Path, zoo: dict[str, Path]) -> Engine:
    """An engine whose source has revisions 'ok' and 'bad' (one NaN)."""
    source = _PoisonSource({"ok": zoo["all-r16"], "bad": zoo["all-r16"]})
    return Engine(tiny_base, EngineConfig(max_model_len=64, adapter_slots=2), source=source)


def test_the_engine_refuses_a_nan_revision_and_keeps_serving(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    params = PARAMS
    with _poisoned_engine(tiny_base, zoo) as eng:
        with pytest.raises(AdapterRefused, match="NaN or Inf"):
            eng.generate([5, 6], "bad", params, timeout=30)
        assert len(eng.generate([5, 6], "ok", params, timeout=30).token_ids) == 4
        assert eng.stats()["loads_failed"] == 1
        assert "bad" not in eng.residency_snapshot()["host_cache"]["revisions"]


def test_a_remembered_refusal_does_not_collect_each_request_s_frames(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    import traceback

    params = PARAMS
    with _poisoned_engine(tiny_base, zoo) as eng:
        depths, messages = [], set()
        for _ in range(6):
            with pytest.raises(AdapterRefused, match="NaN or Inf") as info:
                eng.generate([5, 6], "bad", params, timeout=30)
            depths.append(len(traceback.extract_tb(info.value.__traceback__)))
            messages.add((str(info.value), info.value.reason))
        assert len(messages) == 1  # the same refusal every time
        # Each request raises a copy: the traceback it carries is its own, not all of them.
        assert depths[-1] == depths[1]
        _, kept = eng.residency._failures["bad"]
        assert kept.__traceback__ is None and kept.__context__ is None
        assert eng.stats()["loads_failed"] == 1


def test_a_cancelled_waiter_leaves_no_drain_behind(tiny_base: Path, zoo: dict[str, Path]) -> None:
    # One adapter slot, held by a running request: a request for another revision drains it.
    # Cancelled while it waits, its drain must go with it (while no one else waits for that
    # revision), or a new request for the resident revision waits for the running one's end.
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    config = EngineConfig(max_model_len=128, adapter_slots=1, prefix_caching=False)
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as eng:
        eng.prefetch("kv-r12").result(60)
        sched = eng.scheduler

        def queue(revision: str, params: SamplingParams = long) -> int:
            eng.start_many([([1, 5, 9, 13], revision, params)])
            while not eng._inbox.empty():
                sched.add(eng._inbox.get_nowait())
            return max(eng._seqs)

        def draining() -> list[str | None]:
            return [slot.draining_for for slot in eng.residency.slots]

        queue("kv-r12")
        sched.step()
        first, second = queue("o-r6"), queue("o-r6")
        sched.step()
        assert draining() == ["o-r6"]
        eng.cancel(first)
        sched.step()
        assert draining() == ["o-r6"]  # the second still waits for it
        eng.cancel(second)
        late = eng._seqs[queue("kv-r12", SamplingParams(max_tokens=3, temperature=0.0))]
        sched.step()
        assert draining() == [None]
        assert late.output_ids  # its first token at once, not after the running request's 60
        while sched.has_work:
            sched.step()
        assert eng.residency.slots[0].refs == 0


def test_a_drain_stays_while_another_waiter_for_it_cannot_get_in(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # One adapter slot and two KV slots. Two requests wait for a revision that drains the
    # slot; then a base-model request takes the last KV slot. When the first waiter is
    # cancelled, the second cannot reach the slot in that step (no KV slot free, so it does not
    # ask for the drain again): the drain must stay for it all the same. A drain given up with
    # a waiter left behind is not asked for again until that waiter gets a KV slot.
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    config = EngineConfig(
        max_model_len=128, adapter_slots=1, max_batch_size=2, prefix_caching=False
    )
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as eng:
        eng.prefetch("kv-r12").result(60)
        sched = eng.scheduler

        def queue(revision: str | None) -> int:
            eng.start_many([([1, 5, 9, 13], revision, long)])
            while not eng._inbox.empty():
                sched.add(eng._inbox.get_nowait())
            return max(eng._seqs)

        def draining() -> list[str | None]:
            return [slot.draining_for for slot in eng.residency.slots]

        resident = eng._seqs[queue("kv-r12")]
        sched.step()
        first, second = queue("o-r6"), queue("o-r6")
        sched.step()
        assert draining() == ["o-r6"]
        queue(None)  # the base model needs no adapter slot: it takes the last KV slot
        sched.step()
        assert sched.prefix.available == 0
        eng.cancel(first)
        sched.step()
        assert draining() == ["o-r6"]  # the second still waits for it
        waiter = eng._seqs[second]
        # Until the slot's running request ends (which ends the drain: the slot is idle).
        while not resident.finished:
            assert draining() == ["o-r6"] and waiter.lora_slot < 0
            sched.step()
        while sched.has_work:
            sched.step()
        assert len(waiter.output_ids) == long.max_tokens
        assert eng.residency.slots[0].revision == "o-r6" and eng.residency.slots[0].refs == 0
