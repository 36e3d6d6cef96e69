"""Prefix caching: the slot bookkeeping on a real KV cache, and the engine against itself without it."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.kv_cache import KVCache, KVCacheFull
from mintvcs.serve.prefix_cache import BLOCK, MISS, PrefixCache, block_hashes
from mintvcs.serve.sampling import InvalidSamplingParams, TokenLogprobs

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)


def _tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cache(slots: int = 3) -> PrefixCache:
    kv = KVCache(2, slots, 64, 1, 2, dtype=torch.float32, device=torch.device("cpu"))
    return PrefixCache(kv)


def _admit(cache: PrefixCache, revision: str | None, prompt: list[int]) -> tuple[int, int]:
    """Admit a prompt as the scheduler does: (its slot, how many tokens it got from the cache)."""
    hit = cache.lookup(revision, prompt)
    return cache.admit(revision, prompt, hit), hit.length


def _fill(cache: PrefixCache, slot: int, value: float) -> None:
    for keys, values in zip(cache.kv.keys, cache.kv.values, strict=True):
        keys[slot].fill_(value)
        values[slot].fill_(-value)


# ---------------------------------------------------------------------------- slot bookkeeping
def test_a_retired_prompt_is_found_and_copied_in_whole_blocks_short_of_the_last_token() -> None:
    cache = _cache()
    prompt = _tokens(0, 40)
    slot, cached = _admit(cache, None, prompt)
    assert cached == 0
    _fill(cache, slot, 7.0)
    cache.retire(slot, None, prompt)
    assert cache.idle == 1 and cache.available == 3
    # The same prompt again: its last token must give the logits, and a match counts whole
    # blocks only (a token-exact match would tell a client another one's next token).
    again, cached = _admit(cache, None, prompt)
    assert again != slot and cached == 32
    assert torch.equal(cache.kv.keys[1][again, :, :32], cache.kv.keys[1][slot, :, :32])
    assert bool((cache.kv.values[0][again, :, :32] == -7.0).all())
    # A prompt sharing 30 tokens, then diverging: the one whole block.
    other = [*prompt[:30], 1, 2, 3, *prompt[33:]]
    _, cached = _admit(cache, None, other)
    assert cached == 16
    assert cache.stats.hits == 2 and cache.stats.hit_tokens == 48
    assert cache.stats.queried_tokens == 3 * 40


def test_revisions_and_short_prefixes_do_not_match() -> None:
    cache = _cache()
    prompt = _tokens(1, 40)
    slot, _ = _admit(cache, "a" * 40, prompt)
    cache.retire(slot, "a" * 40, prompt)
    # Another revision's keys differ (its LoRA changes k and v): no match.
    assert cache.match("b" * 40, prompt, 39) == (-1, 0)
    assert cache.match(None, prompt, 39) == (-1, 0)
    assert cache.match("a" * 40, prompt, 39) == (slot, 32)
    # Fewer than a block in common is no match; the limit caps the length.
    assert cache.match("a" * 40, [*prompt[: BLOCK - 1], *[0] * 20], 30) == (-1, 0)
    assert cache.match("a" * 40, prompt, 20) == (slot, 16)
    assert cache.match("a" * 40, prompt, 15) == (-1, 0)
    assert block_hashes("a", prompt)[:1] == block_hashes("a", prompt[:BLOCK])
    assert block_hashes("a", prompt, known=block_hashes("a", prompt[:20])) == block_hashes(
        "a", prompt
    )
    assert block_hashes("a", prompt) != block_hashes("b", prompt)


def test_allocation_keeps_running_slots_lowest_and_moves_what_idle_ones_hold() -> None:
    cache = _cache(3)
    base, short = _tokens(2, 48), _tokens(16, 20)
    short_slot, _ = _admit(cache, None, short)
    long_slot, _ = _admit(cache, None, base)
    _fill(cache, short_slot, 1.0)
    _fill(cache, long_slot, 2.0)
    cache.retire(short_slot, None, short)
    cache.retire(long_slot, None, base)
    assert (short_slot, long_slot) == (0, 1)
    assert cache.match(None, [*base, 9], 48) == (long_slot, 48)
    # A new prompt gets the lowest slot, 0; what slot 0 held moves to the free slot 2.
    assert _admit(cache, None, _tokens(3, 20)) == (0, 0)
    assert cache.match(None, [*short, 0], 20) == (2, 16)
    assert bool((cache.kv.keys[0][2, :, :20] == 1.0).all())
    # No slot is free: the next gets slot 1, and what it held (the long prompt) moves to the
    # least recently used idle slot, 2, whose short prompt is dropped.
    assert _admit(cache, None, _tokens(4, 20)) == (1, 0)
    assert cache.match(None, [*base, 9], 48) == (2, 48)
    assert bool((cache.kv.values[1][2, :, :48] == -2.0).all())
    assert _admit(cache, None, _tokens(5, 20)) == (2, 0)  # the last idle slot, given up
    with pytest.raises(KVCacheFull):
        _admit(cache, None, _tokens(6, 20))


def test_an_idle_copy_another_slot_also_holds_is_given_up_first_and_never_moved() -> None:
    cache = _cache(3)
    base = _tokens(2, 48)
    for prompt in (base[:20], base):
        slot, _ = _admit(cache, None, prompt)
        cache.retire(slot, None, prompt)
    # The longest holder wins (24 tokens against 20), counted in whole blocks.
    assert cache.match(None, [*base[:24], *[9] * 8], 31) == (1, 16)
    # Slot 0's one whole block is slot 1's first: slot 0 is given up, not moved to slot 2.
    assert _admit(cache, None, _tokens(3, 20)) == (0, 0)
    assert cache.kv.free_slots == 1 and cache.idle == 1
    assert cache.match(None, [*base[:20], 0], 20) == (1, 16)


def test_a_spare_copy_is_given_up_before_the_least_recent_only_copy() -> None:
    # Four slots hold A, B, X, X, B least recently used, A in slot 0: a new prompt moves A onto
    # a copy of X (one is enough), rather than drop B's only copy for being the least recent.
    cache = _cache(4)
    a, b, x = _tokens(30, 40), _tokens(31, 40), _tokens(32, 40)
    slots = [_admit(cache, None, p)[0] for p in (a, b, x, x)]
    assert slots == [0, 1, 2, 3]
    for slot, prompt in ((1, b), (2, x), (3, x), (0, a)):  # B least recent, A most
        cache.retire(slot, None, prompt)
    assert _admit(cache, None, _tokens(33, 20)) == (0, 0)  # A moves out of slot 0
    cached = 40 - 40 % 16
    assert cache.lookup(None, [*a, 9]).length == cached
    assert cache.lookup(None, [*b, 9]).length == cached  # B's only copy kept
    assert cache.lookup(None, [*x, 9]).length == cached


def test_the_n_copies_of_one_prompt_go_before_another_prompts_only_copy() -> None:
    # Five slots: Y once, then X with three choices (three idle copies), then X, X and Y
    # again. Y's only copy must outlast X's spare ones.
    cache = _cache(5)
    x, y = _tokens(17, 40), _tokens(18, 40)
    slot, _ = _admit(cache, None, y)
    cache.retire(slot, None, y)
    slots = [_admit(cache, None, x)[0] for _ in range(3)]
    for slot in slots:
        cache.retire(slot, None, x)
    assert cache.idle == 4 and cache.kv.free_slots == 1
    cached = []
    for prompt in (x, x, y):
        slot, n = _admit(cache, None, prompt)
        cache.publish(slot, None, prompt)
        cached.append(n)
    assert cached == [32, 32, 32]


def test_a_scored_copy_is_not_given_up_for_an_unscored_one() -> None:
    cache = _cache(3)
    prompt = _tokens(19, 40)
    lps = (None, *(TokenLogprobs(t, -1.0, ((t, -1.0),)) for t in prompt[1:]))
    scored, _ = _admit(cache, None, prompt)
    cache.publish(scored, None, prompt, lps, 1)
    cache.retire(scored, None, prompt)
    plain, _ = _admit(cache, None, prompt)
    cache.retire(plain, None, prompt)
    assert (scored, plain) == (0, 1)
    # Slot 0 is the lowest and least recent, but only it kept the logprobs: slot 1 goes.
    assert _admit(cache, None, _tokens(20, 20)) == (0, 0)
    _admit(cache, None, _tokens(21, 20))
    assert cache.lookup(None, [*prompt[:35], 9], scored=1).length == 32


def test_with_no_free_slot_the_lowest_holder_is_taken_over_without_a_copy() -> None:
    cache = _cache(2)
    prompt = _tokens(7, 40)
    older, _ = _admit(cache, None, prompt)
    cache.retire(older, None, prompt)
    slot, _ = _admit(cache, None, prompt)
    _fill(cache, slot, 3.0)
    cache.retire(slot, None, prompt)
    assert cache.kv.free_slots == 0 and cache.idle == 2
    # Both hold the prompt: the least recently used is the one matched (the copy came from it).
    assert cache.match(None, prompt, 39) == (older, 32)
    again, cached = _admit(cache, None, [*prompt[:35], 5, 6])
    assert (again, cached) == (older, 32) and cache.idle == 1
    # While it runs, its slot still offers the prefix it kept.
    cache.release(slot)
    assert cache.match(None, prompt, 39) == (older, 32)
    cache.release(again)
    assert cache.match(None, prompt, 39) == (-1, 0) and cache.available == 2
    assert not cache._index  # no hash is left behind, slotless


def test_a_slot_taken_over_holds_the_prefix_it_kept_and_its_logprobs() -> None:
    cache = _cache(1)
    holder = _tokens(15, 60)  # 3 blocks and some
    lps = (None, *(TokenLogprobs(t, -1.0, ((t, -1.0),)) for t in holder[1:]))
    slot, _ = _admit(cache, None, holder)
    cache.publish(slot, None, holder, lps, 1)
    cache.retire(slot, None, holder)
    prompt = [*holder[:35], 5, 6]
    again, cached = _admit(cache, None, prompt)  # the only slot: taken over, 2 blocks kept
    assert (again, cached) == (slot, 32)
    cache.publish(again, None, prompt)  # unscored, running
    # Its third block is gone: the holder's whole prompt finds the two kept, no more, and a
    # scored prompt the logprobs kept of them.
    assert cache.match(None, holder, 59) == (slot, 32)
    hit = cache.lookup(None, [*holder[:35], 9], scored=1)
    assert hit.length == 16 and hit.logprobs == lps[:17]


def test_with_no_free_slot_a_higher_holder_is_copied_down_not_taken_over() -> None:
    cache = _cache(2)
    first, second = _tokens(12, 40), _tokens(13, 40)
    for prompt in (first, second):
        slot, _ = _admit(cache, None, prompt)
        cache.retire(slot, None, prompt)
    # The second took slot 0, and what slot 0 held moved up to slot 1.
    assert cache.match(None, first, 39) == (1, 32) and cache.kv.free_slots == 0
    _fill(cache, 1, 4.0)
    # Running sequences stay lowest: slot 0 is given up and the prefix copied into it, rather
    # than slot 1 taken over.
    again, cached = _admit(cache, None, [*first[:35], 5, 6])
    assert (again, cached) == (0, 32)
    assert bool((cache.kv.keys[1][0, :, :32] == 4.0).all())
    assert cache.match(None, first, 39) == (1, 32) and cache.idle == 1


def test_a_scored_prompt_settles_for_a_scored_holder_below_an_unscored_one() -> None:
    cache = _cache(4)
    context = _tokens(9, 48)  # 3 blocks
    scored_holder = [*context, *_tokens(10, 20)]
    unscored_holder = [*context, *_tokens(11, 40)]
    lps = (None, *(TokenLogprobs(t, -1.0, ((t, -1.0),)) for t in scored_holder[1:]))
    slot, _ = _admit(cache, None, scored_holder)
    cache.publish(slot, None, scored_holder, lps, 1)
    cache.retire(slot, None, scored_holder)
    other, _ = _admit(cache, None, unscored_holder)
    cache.retire(other, None, unscored_holder)
    prompt = [*unscored_holder[:70], 7]  # 3 blocks shared with the scored holder, 4 with the other
    assert cache.lookup(None, prompt).length == 64  # unscored: the deeper holder
    hit = cache.lookup(None, prompt, scored=1)
    assert hit.length == 32 and hit.logprobs is not None and len(hit.logprobs) == 33
    assert cache._held[hit.slot].tokens == scored_holder
    assert [lp.token_id for lp in hit.logprobs[1:]] == scored_holder[1:33]
    assert cache.lookup(None, prompt, scored=2).length == 0  # it kept one alternative only
    # A scored prompt ending one token past a block reuses that block: its last shared
    # token's logprob is kept, and the hidden state before it is all the next one needs.
    short = cache.lookup(None, scored_holder[:33], scored=1)
    assert short.length == 32 and short.logprobs is not None and len(short.logprobs) == 33


def test_a_retired_sequence_of_one_whole_block_is_kept() -> None:
    cache = _cache(2)
    prompt = _tokens(14, BLOCK)
    slot, _ = _admit(cache, None, prompt)
    cache.retire(slot, None, prompt)
    assert cache.idle == 1
    assert cache.lookup(None, [*prompt, 5]).length == BLOCK


def test_a_published_running_prompt_is_a_source_and_disabled_caching_keeps_nothing() -> None:
    cache = _cache(2)
    prompt = _tokens(8, 33)
    slot, _ = _admit(cache, None, prompt)
    cache.publish(slot, None, prompt, hashes=block_hashes(None, prompt))
    assert cache.match(None, [*prompt, 1], 33) == (slot, 32)
    # Retired with its output, the slot's hashes go on from its prompt's: the same as fresh.
    done = [*prompt, *_tokens(9, 30)]
    cache.retire(slot, None, done)
    assert cache._held[slot].hashes == block_hashes(None, done)
    assert cache.match(None, [*done, 1], 63) == (slot, 48)
    off = PrefixCache(_cache(2).kv, enabled=False)
    s, cached = _admit(off, None, prompt)
    off.publish(s, None, prompt)
    off.retire(s, None, prompt)
    assert cached == 0 and off.idle == 0 and off.kv.free_slots == 2
    assert _admit(off, None, prompt) == (0, 0) and off.stats.queried_tokens == 0


def test_kv_slots_are_handed_out_once_and_never_the_scratch_slot() -> None:
    # With CUDA graphs the padding rows of a step write into the scratch slot 0: a sequence
    # holding it would read their keys. A slot freed twice would be given to two sequences.
    kv = KVCache(1, 2, 8, 1, 2, dtype=torch.float32, device=torch.device("cpu"), scratch=True)
    assert kv.keys[0].shape[0] == 3 and kv.lowest_free() == 1
    assert sorted([kv.allocate(), kv.allocate()]) == [1, 2]
    with pytest.raises(KVCacheFull):
        kv.allocate()
    kv.free(2)
    for slot in (2, 0, 3):  # freed already, the scratch slot, past the end
        with pytest.raises(ValueError, match=f"KV slot {slot} is not allocated"):
            kv.free(slot)
    assert kv.free_slots == 1 and kv.allocate() == 2


def test_kv_slots_are_handed_out_lowest_first_whatever_order_they_are_freed_in() -> None:
    # Decode steps read the span of slots up to the highest running one: a freed low slot
    # must be the next one taken.
    kv = KVCache(1, 4, 8, 1, 2, dtype=torch.float32, device=torch.device("cpu"))
    assert kv.keys[0].shape[0] == 4  # no scratch slot
    assert [kv.allocate() for _ in range(4)] == [0, 1, 2, 3]
    for slot in (0, 1, 3):
        kv.free(slot)
    assert kv.lowest_free() == 0
    assert [kv.allocate() for _ in range(3)] == [0, 1, 3]
    for slots, length in ((0, 8), (4, 0)):
        with pytest.raises(ValueError, match="must be positive"):
            KVCache(1, slots, length, 1, 2, dtype=torch.float32, device=torch.device("cpu"))


def test_kv_gather_reads_the_keys_and_values_of_the_slots_asked_for() -> None:
    # Decodes whose slots lie far apart read them gathered rather than as one span.
    cache = _cache(3)
    for slot in range(3):
        _fill(cache, slot, float(slot + 1))
    keys, values = cache.kv.gather(1, torch.tensor([2, 0]), 5)
    assert keys.shape == values.shape == (2, 1, 5, 2)
    assert keys[:, 0, :, 0].tolist() == [[3.0] * 5, [1.0] * 5]
    assert values[:, 0, :, 0].tolist() == [[-3.0] * 5, [-1.0] * 5]


def test_a_prompt_of_whole_blocks_leaves_its_last_block_to_compute() -> None:
    # The prompt's last token must go through the model for the first output's logits: a
    # prompt of exactly two blocks, cached whole, gets one block from the cache, not two.
    cache = _cache()
    prompt = _tokens(12, 2 * BLOCK)
    slot, _ = _admit(cache, None, prompt)
    cache.retire(slot, None, prompt)
    assert cache.lookup(None, prompt).length == BLOCK
    # With the prompt's hashes given (the scheduler's Sequence.prompt_hashes), the last too.
    assert cache.lookup(None, prompt, hashes=block_hashes(None, prompt)).length == BLOCK
    assert cache.match(None, prompt, 2 * BLOCK - 1) == (slot, BLOCK)
    assert cache.lookup(None, [*prompt, 3]).length == 2 * BLOCK


def test_a_hash_collision_costs_a_miss_never_another_prompts_keys() -> None:
    # Collisions forced through publish's caller-given hashes: a slot indexed under another
    # prompt's hashes (or another owner's) is never handed out for that prompt.
    cache = _cache()
    mine, theirs = _tokens(13, 40), _tokens(14, 40)
    slot, _ = _admit(cache, None, mine)
    cache.publish(slot, None, mine, hashes=block_hashes(None, theirs))
    assert cache.lookup(None, theirs) == cache.lookup(None, [*theirs, 1]) == MISS
    other, _ = _admit(cache, "a" * 40, mine)
    cache.publish(other, "a" * 40, mine, hashes=block_hashes(None, mine))
    assert cache.match(None, mine, 39) == (-1, 0)  # the hashes are the base's, the keys not


def test_the_idle_slot_a_prompt_copied_from_is_the_last_given_up() -> None:
    # Least recently used: copying a prefix from an idle slot uses it, so the other idle slot
    # goes first when a slot must be given up (vLLM's LRU over cached blocks).
    cache = _cache(3)
    shared, other = _tokens(15, 40), _tokens(16, 40)
    a, _ = _admit(cache, None, shared)
    cache.retire(a, None, shared)
    b, _ = _admit(cache, None, other)
    cache.retire(b, None, other)
    _, cached = _admit(cache, None, [*shared[:35], 1, 2])  # copies from a
    assert cached == 32 and cache.kv.free_slots == 0
    _admit(cache, None, _tokens(17, 20))  # gives up one idle slot: b's, used less recently
    assert cache.match(None, shared, 39)[1] == 32
    assert cache.match(None, other, 39) == (-1, 0)


# ------------------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engines(tiny_base: Path, zoo: dict[str, Path]) -> tuple[Engine, Engine]:
    config = EngineConfig(max_batch_size=16, max_model_len=256)
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


# 24 + 8 tokens answered: two whole blocks, whose last token (the last answered) was sampled
# but never went through the model, so its keys are not in the cache.
@pytest.mark.parametrize("length", [30, 24])
def test_a_second_turn_reuses_the_first_turns_answer(
    engines: tuple[Engine, Engine], length: int
) -> None:
    cached, plain = engines
    first = _tokens(20 + length, length)
    answer = cached.generate(first, "all-r16", GREEDY, timeout=60).token_ids
    before = cached.stats()["prefix_cache_hit_tokens"]
    second = first + answer + _tokens(21, 5)
    _same(cached, plain, second, "all-r16")
    # The prompt and all but the last generated token were in the cache (whole blocks of it).
    held = len(first) + len(answer) - 1
    assert cached.stats()["prefix_cache_hit_tokens"] - before == held - held % BLOCK


def test_another_revision_does_not_reuse(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    prompt = _tokens(30, 40)
    _same(cached, plain, prompt, "all-r16")
    before = cached.stats()["prefix_cache_hit_tokens"]
    _same(cached, plain, prompt, "mlp-r2")  # same tokens, another adapter: other keys
    _same(cached, plain, prompt, None)
    assert cached.stats()["prefix_cache_hit_tokens"] == before


def _scored(cached: Engine, plain: Engine, prompt: list[int], top: int) -> int:
    """Prompt logprobs with and without the cache agree; how many prompt tokens were cached."""
    params = replace(GREEDY, max_tokens=1, prompt_logprobs=top)
    before = cached.stats()["prefix_cache_hit_tokens"]
    mine = cached.generate(prompt, "qv-r8", params, timeout=60)
    theirs = plain.generate(prompt, "qv-r8", params, timeout=60)
    assert mine.prompt_logprobs is not None and theirs.prompt_logprobs is not None
    assert len(mine.prompt_logprobs) == len(prompt) and mine.prompt_logprobs[0] is None
    for a, b in zip(mine.prompt_logprobs[1:], theirs.prompt_logprobs[1:], strict=True):
        assert a is not None and b is not None and a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top] and len(a.top) == top
    assert mine.token_ids == theirs.token_ids
    return int(cached.stats()["prefix_cache_hit_tokens"] - before)


def test_scored_prompts_reuse_the_logprobs_a_scored_holder_kept(
    engines: tuple[Engine, Engine],
) -> None:
    cached, plain = engines
    context = _tokens(31, 50)
    # Only unscored holders: a scored prompt has no logprobs to copy, so computes it all.
    _same(cached, plain, [*context, 1], "qv-r8")
    assert _scored(cached, plain, [*context, 2, 3], 2) == 0
    # Now a scored holder with 2 alternatives: each choice (lm-eval's loglikelihood) copies
    # the context but its last token, whose hidden state predicts the choice's first token.
    assert _scored(cached, plain, [*context, 4, 5, 6], 1) == 48
    assert _scored(cached, plain, [*context, 7], 2) == 48
    # More alternatives than any holder kept: computed in full.
    assert _scored(cached, plain, [*context, 8], 3) == 0
    # The very same scored prompt again: its whole blocks short of the last token.
    assert _scored(cached, plain, [*context, 7], 2) == 48


def test_prompts_sharing_a_prefix_in_one_batch_compute_it_once(tiny_base: Path) -> None:
    # What an eval harness sends: one request, a list of prompts with a shared few-shot context.
    context = _tokens(60, 64)
    scored = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        ([*context, *_tokens(61 + i, 1 + i)], None, scored) for i in range(5)
    ]
    requests += [([*context, *_tokens(70 + i, 3)], None, GREEDY) for i in range(3)]
    config = EngineConfig(max_batch_size=8, max_model_len=128)
    with (
        Engine(tiny_base, config) as cached,
        Engine(tiny_base, replace(config, prefix_caching=False)) as plain,
    ):
        mine = cached.generate_many(requests, timeout=120)
        theirs = plain.generate_many(requests, timeout=120)
        for a, b in zip(mine, theirs, strict=True):
            assert a.token_ids == b.token_ids
            if a.prompt_logprobs is not None:
                assert b.prompt_logprobs is not None
                assert [lp.logprob for lp in a.prompt_logprobs if lp] == pytest.approx(
                    [lp.logprob for lp in b.prompt_logprobs if lp], abs=1e-4
                )
        # The first prompt computes the context; the others wait a step and copy it.
        computed = cached.stats()["prefill_tokens"]
        assert computed < sum(len(p) for p, _, _ in requests) - 6 * 60
        assert plain.stats()["prefill_tokens"] == sum(len(p) for p, _, _ in requests)


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
    assert cached.stats()["prefix_cache_hit_tokens"] - before == 32
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


def test_a_cache_salt_shares_only_with_the_same_salt(engines: tuple[Engine, Engine]) -> None:
    cached, plain = engines
    prompt = _tokens(80, 40)

    def hits(salt: str | None) -> int:
        before = cached.stats()["prefix_cache_hit_tokens"]
        params = replace(GREEDY, cache_salt=salt)
        mine = cached.generate(prompt, "all-r16", params, timeout=60)
        assert mine.token_ids == plain.generate(prompt, "all-r16", params, timeout=60).token_ids
        return int(cached.stats()["prefix_cache_hit_tokens"] - before)

    assert hits("tenant-a") == 0
    assert hits(None) == 0  # unsalted requests do not see a salted prompt, nor the reverse
    assert hits("tenant-b") == 0
    assert hits("tenant-a") == 32 and hits(None) == 32
    # Queued together, the same prompt under two salts is two prefills, not one and a fork.
    before = cached.stats()["prefill_tokens"]
    pair = [(prompt, "all-r16", replace(GREEDY, cache_salt=s)) for s in ("tenant-c", "tenant-d")]
    done = cached.generate_many(pair, timeout=60)
    assert all(c.token_ids == done[0].token_ids for c in done)
    assert cached.stats()["prefill_tokens"] - before == 2 * len(prompt)
    with pytest.raises(InvalidSamplingParams, match="cache_salt"):
        SamplingParams(cache_salt="")
    with pytest.raises(InvalidSamplingParams, match="cache_salt"):
        SamplingParams(cache_salt="x" * 2000)


def test_a_revision_named_base_never_shares_the_bases_salted_cache(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # Owners are (revision, salt) pairs: no name a source gives a revision spells the base's.
    prompt = _tokens(81, 40)
    params = replace(GREEDY, cache_salt="tenant")
    with Engine(
        tiny_base,
        EngineConfig(max_model_len=128, prefix_caching=False),
        source=PeftDirSource({"all-r16": zoo["all-r16"]}),
    ) as reference:
        want = reference.generate(prompt, "all-r16", params, timeout=60).token_ids
    for caching in (True, False):
        with Engine(
            tiny_base,
            EngineConfig(max_model_len=128, prefix_caching=caching),
            source=PeftDirSource({"base": zoo["all-r16"]}),
        ) as engine:
            engine.prefetch("base").result(30)
            if caching:  # the base's salted prompt cached first
                engine.generate(prompt, None, params, timeout=60)
                assert engine.generate(prompt, "base", params, timeout=60).token_ids == want
            else:  # queued together: a fork of the base's request, before the fix
                done = engine.generate_many([(prompt, None, params), (prompt, "base", params)])
                assert done[1].token_ids == want


def test_a_prompt_still_going_in_serves_none_of_its_blocks_until_they_are_in(
    tiny_base: Path,
) -> None:
    # 40 tokens a step: the first prompt goes in over two steps; the second, which shares all
    # its 64 tokens, comes in at the second and must wait for the blocks that step computes.
    first = _tokens(80, 64)
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (first, None, GREEDY),
        ([*first, *_tokens(81, 6)], None, GREEDY),
    ]
    config = EngineConfig(max_batch_size=4, max_model_len=128, max_num_batched_tokens=40)
    with (
        Engine(tiny_base, config) as cached,
        Engine(tiny_base, replace(config, prefix_caching=False)) as plain,
    ):
        mine = cached.generate_many(requests, timeout=120)
        theirs = plain.generate_many(requests, timeout=120)
        for a, b in zip(mine, theirs, strict=True):
            assert a.token_ids == b.token_ids
        assert cached.stats()["prefix_cache_hit_tokens"] == 64


def _first_token_steps(
    engine: Engine, requests: list[tuple[list[int], str | None, SamplingParams]]
) -> list[int]:
    """Step an engine made with start=False by hand until `requests` end: each one's first
    token's step (counted from 1), so that the order of admissions is exact."""
    engine.start_many(requests)
    sched = engine.scheduler
    seqs = sorted(engine._seqs.values(), key=lambda s: s.request_id)[-len(requests) :]
    while not engine._inbox.empty():
        sched.add(engine._inbox.get_nowait())
    first = [0] * len(seqs)
    for step in range(1, 500):
        sched.step()
        for i, seq in enumerate(seqs):
            if not first[i] and seq.output_ids:
                first[i] = step
        if not sched.has_work:
            return first
        time.sleep(0.001)  # an adapter load runs on the residency's thread
    raise AssertionError(f"the requests did not end: first tokens at {first}")


@pytest.mark.parametrize("caching", [True, False])
def test_a_prompt_waiting_for_blocks_going_in_keeps_its_place_in_the_queue(
    tiny_base: Path, zoo: dict[str, Path], caching: bool
) -> None:
    # Q goes in; P shares Q's first 48 tokens and waits a step to copy them. A younger request
    # must not go first meanwhile: B (another revision) would drain the only adapter slot,
    # which P's revision holds; C would take the last KV slot. P would then wait for Q's
    # 40 tokens, with the prefix cache on only.
    query = [1, *_tokens(90, 63)]
    shared = [*query[:48], *_tokens(91, 9)]
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    short = replace(long, max_tokens=5)
    config = EngineConfig(max_model_len=128, adapter_slots=1, prefix_caching=caching)
    source = PeftDirSource(zoo)
    with Engine(tiny_base, replace(config, max_batch_size=4), source=source, start=False) as one:
        one.prefetch("kv-r12").result(60)
        steps = _first_token_steps(
            one,
            [(query, "kv-r12", long), (shared, "kv-r12", short), (_tokens(92, 20), "o-r6", long)],
        )
        assert steps[0] == 1 and steps[1] <= 2  # at step 41 before the fix (cache on)
        assert one.scheduler.prefix.stats.hit_tokens == (48 if caching else 0)
    with Engine(tiny_base, replace(config, max_batch_size=2), source=source, start=False) as two:
        steps = _first_token_steps(
            two, [(query, None, long), (shared, None, short), (_tokens(93, 20), None, long)]
        )
        assert steps[0] == 1 and steps[1] <= 2  # at step 41 before the fix (cache on)
