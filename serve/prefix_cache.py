"""Prefix caching across requests: KV slots remember which tokens they hold, so a new prompt that
starts with the same tokens (for the same revision) copies their keys and values instead of
computing them again.

A finished sequence's slot is not freed but kept, idle, with its tokens; idle slots are taken
back least recently used first, and only once no free slot is left. A running sequence's slot
counts too, for its prompt, once that is in the cache. Lookups go by a chain of hashes over
blocks of BLOCK tokens (each block's hash covers everything before it and the revision, as
vLLM's prefix cache keys its blocks), then compare the tokens themselves: a hash collision can
only cost a miss, never give a request another prompt's keys.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mintvcs.serve.kv_cache import KVCache, KVCacheFull

BLOCK = 16  # tokens per hashed block: shorter shared prefixes are not worth a lookup


def block_hashes(
    revision: str | None, tokens: Sequence[int], limit: int | None = None
) -> list[int]:
    """The chain hash of each whole block of tokens[:limit]; hash i covers tokens[: (i + 1) * BLOCK]."""
    end = len(tokens) if limit is None else min(limit, len(tokens))
    out: list[int] = []
    seed = hash(("mint-prefix", revision))
    for start in range(0, end - BLOCK + 1, BLOCK):
        seed = hash((seed, *tokens[start : start + BLOCK]))
        out.append(seed)
    return out


@dataclass
class PrefixStats:
    """Prompt tokens looked up and found, for /metrics (vLLM's prefix cache queries and hits)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    hits: int = 0  # prompts that found a cached prefix


@dataclass
class _Held:
    revision: str | None
    tokens: list[int]  # the tokens whose keys and values positions 0 .. len - 1 of the slot hold
    hashes: list[int]


class PrefixCache:
    """The KV slots' owner for the scheduler: allocation, idle slots kept for reuse, and lookup."""

    def __init__(self, kv: KVCache, *, enabled: bool = True) -> None:
        self.kv = kv
        self.enabled = enabled
        self.stats = PrefixStats()
        self._held: dict[int, _Held] = {}  # slot -> what its cache positions hold
        self._index: dict[int, dict[int, None]] = {}  # block chain hash -> slots holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # finished slots, least recent first

    @property
    def available(self) -> int:
        """Slots a new sequence can get: free ones and idle ones (their contents are given up)."""
        return self.kv.free_slots + len(self._idle)

    @property
    def idle(self) -> int:
        """Slots kept only for what they hold."""
        return len(self._idle)

    def allocate(self, keep: int = -1) -> int:
        """A slot for a new sequence: a free one, else the least recently used idle one but `keep`."""
        if self.kv.free_slots:
            return self.kv.allocate()
        for slot in self._idle:
            if slot != keep:
                del self._idle[slot]
                self._forget(slot)
                return slot
        raise KVCacheFull(
            f"all {self.kv.num_slots} KV slots are in use; raise max_batch_size or wait"
        )

    def admit(
        self, revision: str | None, prompt: Sequence[int], *, reuse: bool = True
    ) -> tuple[int, int]:
        """A slot for a new prompt and how many of its first tokens are already in it (copied
        from the longest cached prefix when `reuse`; the last prompt token is always computed)."""
        src, length = (-1, 0)
        if reuse and self.enabled:
            src, length = self.match(revision, prompt, len(prompt) - 1)
            self.stats.queried_tokens += len(prompt)
        if length == 0:
            return self.allocate(), 0
        self.stats.hits += 1
        self.stats.hit_tokens += length
        if src in self._idle and self.kv.free_slots == 0:
            # A slot must be given up anyway: give up the one holding the prefix, with no copy.
            # Only what it held past `length` is lost, and while this prompt runs its slot
            # still offers the prefix to others (match prefers the least recently used holder,
            # so the most recent conversations keep their tails longest).
            del self._idle[src]
            self._hold(src, revision, list(prompt[:length]))
            return src, length
        slot = self.allocate(keep=src)
        self.kv.copy_prefix(src, slot, length)
        if src in self._idle:
            self._idle.move_to_end(src)
        return slot, length

    def match(self, revision: str | None, tokens: Sequence[int], limit: int) -> tuple[int, int]:
        """(slot, n): a slot whose cache holds tokens[:n] with the largest n <= limit; (-1, 0) if none
        holds a whole block of them."""
        best: dict[int, None] = {}
        for h in block_hashes(revision, tokens, limit):
            found = self._index.get(h)
            if not found:
                break
            best = found
        # Longest first; among equals an idle slot, least recently used first (the one an
        # allocation would give up next), then running ones.
        rank = {s: i for i, s in enumerate(self._idle)} if len(best) > 1 else {}
        key, slot = (0, 0), -1
        for candidate in best:
            held = self._held[candidate]
            if held.revision != revision:
                continue
            n = _common_prefix(held.tokens, tokens, limit)
            k = (n, -rank.get(candidate, len(rank)))
            if k > key:
                key, slot = k, candidate
        length = key[0]
        return (slot, length) if length >= BLOCK else (-1, 0)

    def publish(self, slot: int, revision: str | None, tokens: Sequence[int]) -> None:
        """Record that the slot's cache now holds `tokens` (a running sequence's prompt)."""
        if self.enabled:
            self._hold(slot, revision, list(tokens))

    def retire(self, slot: int, revision: str | None, tokens: Sequence[int]) -> None:
        """A sequence is done with its slot, whose cache holds `tokens`: keep it idle for reuse."""
        if not self.enabled or len(tokens) < BLOCK:
            self.release(slot)
            return
        self._hold(slot, revision, list(tokens))
        self._idle[slot] = None

    def release(self, slot: int) -> None:
        """A sequence is done with its slot and what it holds is not to be trusted: free it."""
        self._forget(slot)
        self._idle.pop(slot, None)
        self.kv.free(slot)

    def clear(self) -> None:
        """Free every idle slot and forget every cached prefix."""
        for slot in list(self._idle):
            self.release(slot)
        for slot in list(self._held):
            self._forget(slot)

    def _hold(self, slot: int, revision: str | None, tokens: list[int]) -> None:
        self._forget(slot)
        hashes = block_hashes(revision, tokens)
        self._held[slot] = _Held(revision, tokens, hashes)
        for h in hashes:
            self._index.setdefault(h, {})[slot] = None

    def _forget(self, slot: int) -> None:
        held = self._held.pop(slot, None)
        if held is None:
            return
        for h in held.hashes:
            slots = self._index.get(h)
            if slots is not None:
                slots.pop(slot, None)
                if not slots:
                    del self._index[h]


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]: bisect on slice equality (C speed)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
