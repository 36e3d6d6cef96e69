"""Prefix caching across requests: KV slots remember which tokens they hold, so a new prompt that
starts with the same tokens for the same owner copies their keys and values instead of
computing them again. The owner is whose keys and values they are: the pair of the revision
(None for the base) and the request's cache_salt (None without one) (Sequence.cache_owner), so
that only requests with the same salt share (vLLM's isolation between tenants).

A finished sequence's slot is not freed but kept, idle, with its tokens (unless they are fewer
than BLOCK); an idle slot is given
up when a new sequence needs a slot and none is free, least recently used first. A running
sequence's slot counts too, for its prompt, once that is in the cache. Lookups go by a chain of
hashes over blocks of BLOCK tokens (each block's hash covers everything before it and the
owner, as vLLM's prefix cache keys its blocks), then compare the tokens themselves: a hash
collision can only cost a miss, never give a request another prompt's keys.

A slot whose prompt was scored (prompt logprobs) also keeps those logprobs, so that a scored
prompt (lm-eval's loglikelihood: a shared context, then each choice) can reuse the prefix too:
it copies the logprobs of the whole blocks that end before its last shared token and
recomputes from there: the last shared token's hidden state predicts its first own token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from mintvcs.serve.kv_cache import KVCache, KVCacheFull
from mintvcs.serve.sampling import TokenLogprobs

BLOCK = 16  # tokens per hashed block: shorter shared prefixes are not worth a lookup
# Whose keys and values a slot holds: (revision or None for the base, cache_salt or None).
Owner = tuple[str | None, str | None]


def block_hashes(
    owner: Owner,
    tokens: Sequence[int],
    limit: int | None = None,
    known: Sequence[int] = (),
) -> list[int]:
    """The chain hash of each whole block of tokens[:limit]; hash i covers tokens[: (i + 1) * BLOCK].

    `known`: the hashes of tokens' first blocks, already computed; the chain goes on from them.
    """
    end = len(tokens) if limit is None else min(limit, len(tokens))
    out = list(known)
    seed = known[-1] if known else hash(("mint-prefix", owner))
    for start in range(len(known) * BLOCK, end - BLOCK + 1, BLOCK):
        seed = hash((seed, *tokens[start : start + BLOCK]))
        out.append(seed)
    return out


PromptLogprobs = tuple[TokenLogprobs | None, ...]  # one per prompt position; None for the first


@dataclass
class PrefixStats:
    """Prompt tokens looked up and found, for /metrics (vLLM's prefix cache queries and hits)."""

    queried_tokens: int = 0
    hit_tokens: int = 0
    hits: int = 0  # prompts that found a cached prefix


@dataclass
class _Held:
    owner: Owner
    tokens: list[int]  # the tokens whose keys and values positions 0 .. len - 1 of the slot hold
    hashes: list[int]
    # The logprobs of tokens[: len(logprobs)] (a scored prompt's), with `top` alternatives each.
    logprobs: PromptLogprobs | None = None
    top: int = 0


@dataclass(frozen=True)
class Hit:
    """Where a prompt's longest cached prefix is: its keys and values, and logprobs if asked."""

    slot: int  # -1 = none
    length: int  # prompt tokens whose keys and values the slot holds (0 = none)
    logprobs: PromptLogprobs | None = None  # positions 0 .. length, for a scored prompt


MISS = Hit(-1, 0)


class PrefixCache:
    """Hands out the KV slots for the scheduler: allocation, idle slots kept for reuse, and lookup."""

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
        """A slot for a new sequence: the lowest one free or idle (but `keep`).

        Decode steps read KV slots 0 up to the highest in use (a view, or CUDA graphs' bucket),
        so running sequences must stay in the lowest slots. When the lowest is idle, what it
        holds moves to the slot the cache gives up instead: the lowest free one, else an idle
        one, whose own contents are dropped. Idle copies that another slot also holds (the
        `n` choices of one prompt each leave one) are given up first, least recently used
        first, then the others; the lowest is given up, not moved, when it is such a copy.
        """
        free = self.kv.lowest_free()
        low = min((s for s in self._idle if s != keep), default=None)
        if low is None or (free is not None and free < low):
            if free is None:
                raise KVCacheFull(
                    f"all {self.kv.num_slots} KV slots are in use; raise max_batch_size or wait"
                )
            return self.kv.allocate()
        if self._redundant(low):
            del self._idle[low]
            self._forget(low)
            return low
        if free is not None:
            spare = self.kv.allocate()
        else:
            victims = [s for s in self._idle if s != keep]
            spare = next((s for s in victims if s != low and self._redundant(s)), victims[0])
            if spare == low:
                del self._idle[low]
                self._forget(low)
                return low
            self._forget(spare)
        held = self._held[low]
        self.kv.copy_prefix(low, spare, len(held.tokens))
        self._forget(low)
        # spare takes low's place in the recency order; its own place (if it had one) goes.
        self._idle = OrderedDict((spare if s == low else s, None) for s in self._idle if s != spare)
        self._hold(spare, held.owner, held.tokens, held.logprobs, held.top, held.hashes)
        return low

    def _redundant(self, slot: int) -> bool:
        """Whether another slot holds every whole block the idle `slot` holds (and the prompt
        logprobs it kept): giving it up loses no hit. By block hash: a collision costs a miss."""
        held = self._held[slot]
        if not held.hashes:
            return True
        for other in self._index.get(held.hashes[-1], {}):
            theirs = self._held[other]
            if other == slot or theirs.owner != held.owner:
                continue
            if held.logprobs is None or (
                theirs.logprobs is not None
                and len(theirs.logprobs) >= len(held.logprobs)
                and theirs.top >= held.top
            ):
                return True
        return False

    def lookup(
        self,
        owner: Owner,
        prompt: Sequence[int],
        *,
        hashes: Sequence[int] | None = None,
        scored: int | None = None,
    ) -> Hit:
        """The longest cached prefix of `prompt` usable for it, short of its last token (whose
        logits give the first output token). `scored`: the prompt asks for prompt logprobs with
        this many alternatives, which the holder must have kept."""
        if not self.enabled:
            return MISS
        slot, length = self.match(owner, prompt, len(prompt) - 1, hashes=hashes, scored=scored)
        if slot < 0:
            return MISS
        logprobs = None
        if scored is not None:
            kept = self._held[slot].logprobs
            assert kept is not None
            logprobs = tuple(
                None if lp is None else lp.keep_top(scored) for lp in kept[: length + 1]
            )
        return Hit(slot, length, logprobs)

    def admit(self, owner: Owner, prompt: Sequence[int], hit: Hit = MISS) -> int:
        """A slot for a new prompt, holding the first `hit.length` of its tokens' keys and values."""
        if self.enabled:
            self.stats.queried_tokens += len(prompt)
        src, length = hit.slot, hit.length
        if length == 0:
            return self.allocate()
        self.stats.hits += 1
        self.stats.hit_tokens += length
        if src in self._idle and self.kv.free_slots == 0 and src == min(self._idle):
            # A slot must be given up anyway, and this is the one allocate() would hand out:
            # take it over with no copy. Only what it held past `length` is lost, and while
            # this prompt runs its slot still offers the prefix to others.
            del self._idle[src]
            held = self._held[src]
            kept = None if held.logprobs is None else held.logprobs[:length]
            self._hold(src, owner, list(prompt[:length]), kept, held.top)
            return src
        slot = self.allocate(keep=src)
        self.kv.copy_prefix(src, slot, length)
        if src in self._idle:
            self._idle.move_to_end(src)
        return slot

    def match(
        self,
        owner: Owner,
        tokens: Sequence[int],
        limit: int,
        *,
        hashes: Sequence[int] | None = None,
        scored: int | None = None,
    ) -> tuple[int, int]:
        """(slot, n): a slot whose cache holds tokens[:n] with the largest n <= limit; (-1, 0) if none
        holds a whole block of them. `scored`: only the positions whose logprobs (with that many
        alternatives) the slot kept count, and the last of them is left to recompute."""
        if hashes is None:
            hashes = block_hashes(owner, tokens, limit)
        levels: list[dict[int, None]] = []  # levels[d]: the slots holding blocks 0 .. d
        for h in hashes[: max(limit, 0) // BLOCK]:
            found = self._index.get(h)
            if not found:
                break
            levels.append(found)

        def usable(slot: int) -> bool:
            held = self._held[slot]
            if held.owner != owner:
                return False
            return scored is None or (held.logprobs is not None and held.top >= scored)

        # The deepest level with a usable holder (a scored prompt may have to settle for a
        # scored holder below an unscored one that holds more of it).
        best: list[int] = []
        while levels and not best:
            best = [s for s in levels[-1] if usable(s)]
            if not best:
                levels.pop()
        # Every candidate shares the first `depth` blocks' hashes: compare only what follows
        # (less than a block, or the next block would have matched), and the winner's whole
        # prefix once, against a hash collision.
        start = len(levels) * BLOCK
        end = limit + (scored is not None)
        tail = tokens[start : min(end, start + BLOCK + 1)]
        # Longest first; among equals an idle slot, least recently used first (the one an
        # allocation would give up next), then running ones.
        rank = {s: i for i, s in enumerate(self._idle)} if len(best) > 1 else {}
        key, slot = (0, 0), -1
        for candidate in best:
            held = self._held[candidate]
            n = start + _common_prefix(held.tokens[start : start + len(tail)], tail)
            if held.logprobs is not None and scored is not None:
                # Position i's logprob is kept for i < len(logprobs) when tokens[: i + 1] agree;
                # the prompt's next position needs the hidden state of the last one reused.
                n = min(n, len(held.logprobs)) - 1
            k = (n, -rank.get(candidate, len(rank)))
            if k > key:
                key, slot = k, candidate
        # Whole blocks only: reporting (cached_tokens) or timing a match down to the token would
        # let one client learn another's prompt a token at a time (vLLM also shares blocks).
        length = key[0] - key[0] % BLOCK
        if length < BLOCK or self._held[slot].tokens[:start] != list(tokens[:start]):
            return -1, 0
        return slot, length

    def publish(
        self,
        slot: int,
        owner: Owner,
        tokens: Sequence[int],
        logprobs: PromptLogprobs | None = None,
        top: int = 0,
        hashes: Sequence[int] = (),
    ) -> None:
        """Record that the slot's cache now holds `tokens` (a running sequence's prompt), and the
        prompt's logprobs with `top` alternatives when it was scored. `hashes`: the prompt's
        block hashes when the caller has them (Sequence.prompt_hashes)."""
        if self.enabled:
            self._hold(slot, owner, list(tokens), logprobs, top, hashes)

    def retire(self, slot: int, owner: Owner, tokens: Sequence[int]) -> None:
        """A sequence is done with its slot, whose cache holds `tokens`: keep it idle for reuse."""
        if not self.enabled or len(tokens) < BLOCK:
            self.release(slot)
            return
        self._hold(slot, owner, list(tokens))
        self._idle[slot] = None

    def release(self, slot: int) -> None:
        """A sequence is done with its slot and what it holds is not to be trusted: free it."""
        self._forget(slot)
        self._idle.pop(slot, None)
        self.kv.free(slot)

    def _hold(
        self,
        slot: int,
        owner: Owner,
        tokens: list[int],
        logprobs: PromptLogprobs | None = None,
        top: int = 0,
        known: Sequence[int] = (),
    ) -> None:
        prev = self._held.get(slot)
        if prev is not None and prev.owner == owner:
            # The same sequence going on (its prompt published, now retired with its output):
            # what it held is a prefix of what it holds, and so are its hashes and the prompt
            # logprobs it kept.
            n = len(prev.hashes) * BLOCK
            if not known and prev.tokens[:n] == tokens[:n]:
                known = prev.hashes
            n = len(prev.logprobs or ())
            if logprobs is None and prev.logprobs is not None and prev.tokens[:n] == tokens[:n]:
                logprobs, top = prev.logprobs, prev.top
        self._forget(slot)
        hashes = block_hashes(owner, tokens, known=known)
        self._held[slot] = _Held(owner, tokens, hashes, logprobs, top)
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


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
