"""Prefix caching: the slot bookkeeping on a real KV cache, and the engine against itself without it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.kv_cache import KVCache, KVCacheFull
from mintvcs.serve.prefix_cache import BLOCK, PrefixCache, block_hashes

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache(slots: int = 3) -> PrefixCache:
    kv = KVCache(2, slots, 64, 1, 2, dtype=torch.float32, device=torch.device("cpu"))
    return PrefixCache(kv)


def _fill(cache: PrefixCache, slot: int, value: float) -> None:
    for keys, values in zip(cache.kv.keys, cache.kv.values, strict=True):
        keys[slot].fill_(value)
        values[slot].fill_(-value)


# ---------------------------------------------------------------------------- slot bookkeeping
def test_a_retired_prompt_is_found_and_copied_up_to_the_last_token() -> None:
    cache = _cache()
    prompt = _tokens(0, 40)
    slot, cached = cache.admit(None, prompt)
    assert cached == 0
    _fill(cache, slot, 7.0)
    cache.retire(slot, None, prompt)
    assert cache.idle == 1 and cache.available == 3
    # The same prompt again: everything but its last token, which must give the logits.
    again, cached = cache.admit(None, prompt)
    assert again != slot and cached == 39
    assert torch.equal(cache.kv.keys[1][again, :, :39], cache.kv.keys[1][slot, :, :39])
    assert bool((cache.kv.values[0][again, :, :39] == -7.0).all())
    # A prompt sharing 30 tokens, then diverging: 30 (past the block boundary), not 16 or 32.
    other = [*prompt[:30], 1, 2, 3, *prompt[33:]]
    _, cached = cache.admit(None, other)
    assert cached == 30
    assert cache.stats.hits == 2 and cache.stats.hit_tokens == 69
    assert cache.stats.queried_tokens == 3 * 40


def test_revisions_and_short_prefixes_do_not_match() -> None:
    cache = _cache()
    prompt = _tokens(1, 40)
    slot, _ = cache.admit("a" * 40, prompt)
    cache.retire(slot, "a" * 40, prompt)
    # Another revision's keys differ (its LoRA changes k and v): no match.
    assert cache.match("b" * 40, prompt, 39) == (-1, 0)
    assert cache.match(None, prompt, 39) == (-1, 0)
    assert cache.match("a" * 40, prompt, 39) == (slot, 39)
    # Fewer than a block in common is no match; the limit caps the length.
    assert cache.match("a" * 40, prompt[: BLOCK - 1] + [0] * 20, 30) == (-1, 0)
    assert cache.match("a" * 40, prompt, 20) == (slot, 20)
    assert block_hashes("a", prompt)[:1] == block_hashes("a", prompt[:BLOCK])
    assert block_hashes("a", prompt) != block_hashes("b", prompt)


def test_the_longest_holder_wins_and_idle_slots_go_least_recently_used_first() -> None:
    cache = _cache(3)
    base = _tokens(2, 48)
    short_slot, _ = cache.admit(None, base[:20])
    cache.retire(short_slot, None, base[:20])
    long_slot, _ = cache.admit(None, base)
    cache.retire(long_slot, None, base)
    assert cache.match(None, [*base, 9], 48) == (long_slot, 48)
    assert cache.match(None, base[:24] + [9] * 8, 31) in ((short_slot, 20), (long_slot, 24))
    assert cache.match(None, base[:24] + [9] * 8, 31)[1] == 24
    # Three slots, two idle: a new prompt takes the free one, the next evicts the oldest idle.
    third, _ = cache.admit(None, _tokens(3, 20))
    assert third not in (short_slot, long_slot) and cache.kv.free_slots == 0
    fourth, _ = cache.admit(None, _tokens(4, 20))
    assert fourth == short_slot and cache.match(None, [*base[:20], 0], 20) == (long_slot, 20)
    assert cache.admit(None, _tokens(5, 20))[0] == long_slot  # the last idle slot
    with pytest.raises(KVCacheFull):
        cache.admit(None, _tokens(6, 20))


def test_with_no_free_slot_the_holder_is_taken_over_without_a_copy() -> None:
    cache = _cache(2)
    prompt = _tokens(7, 40)
    older, _ = cache.admit(None, prompt)
    cache.retire(older, None, prompt)
    slot, _ = cache.admit(None, prompt)
    _fill(cache, slot, 3.0)
    cache.retire(slot, None, prompt)
    assert cache.kv.free_slots == 0 and cache.idle == 2
    # Both hold the prompt: the least recently used is the one taken (the copy came from it).
    assert cache.match(None, prompt, 39) == (older, 39)
    again, cached = cache.admit(None, [*prompt[:35], 5, 6])
    assert (again, cached) == (older, 35) and cache.idle == 1
    # While it runs, its slot still offers the prefix it kept.
    cache.release(slot)
    assert cache.match(None, prompt, 39) == (older, 35)
    cache.release(again)
    assert cache.match(None, prompt, 39) == (-1, 0) and cache.available == 2


def test_a_published_running_prompt_is_a_source_and_disabled_caching_keeps_nothing() -> None:
    cache = _cache(2)
    prompt = _tokens(8, 33)
    slot, _ = cache.admit(None, prompt)
    cache.publish(slot, None, prompt)
    assert cache.match(None, [*prompt, 1], 33) == (slot, 33)
    off = PrefixCache(_cache(2).kv, enabled=False)
    s, cached = off.admit(None, prompt)
    off.publish(s, None, prompt)
    off.retire(s, None, prompt)
    assert cached == 0 and off.idle == 0 and off.kv.free_slots == 2
    assert off.admit(None, prompt) == (0, 0) and off.stats.queried_tokens == 0


# ------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engines(tiny_base: Path, zoo: dict[str, Path]) -> tuple[Engine, Engine]:
    config = EngineConfig(max_batch_size=4, max_model_len=256)
    cached = Engine(tiny_base, config, source=PeftDirSource(zoo))
    plain = Engine(tiny_base, replace(config, prefix_caching=False), source=PeftDirSource(zoo))
    yield cached, plain
    cached.close()
    plain.close()


def _same(cached: Engine, plain: Engine, prompt: list[int], name: str | None) -> None:
    mine = cached.generate(prompt, name, GREEDY, timeout=60)
    theirs = plain.generate(prompt, name, GREEDY, timeout=60)
    assert mine.token_ids == theirs.token_ids
    assert mine.logprobs is not None and theirs.logprobs is not None
    assert [lp.logprob for lp in mine.logprobs] == pytest.approx(
        [lp.logprob for lp in theirs.logprobs], abs=1e-4
    )


@pytest.mark.parametrize("name", [None, "all-r16", "qv-r8"])
def test_a_shared_prefix_is_computed_once_and_gives_the_same_tokens(
    engines: tuple[Engine, Engine], name: str | None
) -> None:
    cached, plain = engines
    system = _tokens(10, 48)
    _same(cached, plain, system + _tokens(11, 9), name)
    before = cached.stats()
    _same(cached, plain, system + _tokens(12, 13), name)
    after = cached.stats()
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 48
    assert after["prefill_tokens"] - before["prefill_tokens"] == 13


def test_a_second_turn_reuses_the_first_turns_answer(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    first = _tokens(20, 30)
    answer = cached.generate(first, "all-r16", GREEDY, timeout=60).token_ids
    before = cached.stats()["prefix_cache_hit_tokens"]
    second = first + answer + _tokens(21, 5)
    _same(cached, plain, second, "all-r16")
    # The prompt and all but the last generated token were in the cache.
    assert cached.stats()["prefix_cache_hit_tokens"] - before == len(first) + len(answer) - 1


def test_another_revision_and_prompt_logprobs_do_not_reuse(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    prompt = _tokens(30, 40)
    _same(cached, plain, prompt, "all-r16")
    before = cached.stats()["prefix_cache_hit_tokens"]
    _same(cached, plain, prompt, "mlp-r2")  # same tokens, another adapter: other keys
    _same(cached, plain, prompt, None)
    assert cached.stats()["prefix_cache_hit_tokens"] == before
    scored = replace(GREEDY, prompt_logprobs=1)
    mine = cached.generate(prompt, "all-r16", scored, timeout=60)
    theirs = plain.generate(prompt, "all-r16", scored, timeout=60)
    assert cached.stats()["prefix_cache_hit_tokens"] == before
    assert mine.prompt_logprobs is not None and theirs.prompt_logprobs is not None
    assert [lp.logprob for lp in mine.prompt_logprobs if lp] == pytest.approx(
        [lp.logprob for lp in theirs.prompt_logprobs if lp], abs=1e-4
    )


def test_a_running_requests_prompt_serves_one_that_arrives_later(
    engines: tuple[Engine, Engine],
) -> None:
    cached, plain = engines
    prompt = _tokens(40, 36)
    long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
    running = cached.start_many([(prompt, "qv-r8", long)])[0]
    deadline = time.monotonic() + 30
    while not cached.scheduler.running:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    before = cached.stats()["prefix_cache_hit_tokens"]
    _same(cached, plain, [*prompt, 7, 8, 9], "qv-r8")
    assert cached.stats()["prefix_cache_hit_tokens"] - before == 36
    assert running.result(timeout=60).token_ids == plain.generate(prompt, "qv-r8", long).token_ids


def test_many_prompts_through_few_slots_evict_and_stay_right(tiny_base: Path) -> None:
    config = EngineConfig(max_batch_size=2, max_model_len=128)
    system = _tokens(50, 20)
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (system + _tokens(51 + i, 4 + i), None, GREEDY) for i in range(7)
    ]
    requests += [(r[0], None, GREEDY) for r in requests[:3]]
    with (
        Engine(tiny_base, config) as cached,
        Engine(tiny_base, replace(config, prefix_caching=False)) as plain,
    ):
        mine = cached.generate_many(requests, timeout=120)
        theirs = plain.generate_many(requests, timeout=120)
        assert [c.token_ids for c in mine] == [c.token_ids for c in theirs]
        stats = cached.stats()
        assert stats["prefix_cache_hits"] >= 3 and stats["kv_slots_free"] == 2
        assert stats["kv_slots_cached"] == 2 and plain.stats()["kv_slots_cached"] == 0
