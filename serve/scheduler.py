"""Continuous batching at iteration level: every step admits waiting requests (prefill), decodes the
running ones, and retires the finished, with requests for different adapters in one batch."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mintvcs.errors import MintError
from mintvcs.kernels import Backend
from mintvcs.serve.graphs import DecodeGraphs
from mintvcs.serve.kv_cache import KVCache
from mintvcs.serve.model import Model, StepBatch
from mintvcs.serve.prefix_cache import BLOCK, Owner, PrefixCache, block_hashes
from mintvcs.serve.sampling import (
    IncrementalDetokenizer,
    PenaltyHistory,
    SamplingParams,
    TokenLogprobs,
    adjust_logits,
    find_stop,
    sample_rows,
    stop_tail_start,
    token_logprobs,
)
from mintvcs.serve.slots import Residency
from mintvcs.serve.structured import (
    StructuredOutputError,
    blocked_tokens,
    matcher_error,
    token_bitmask,
    worn_out,
)

log = logging.getLogger("mintvcs.serve")

# Prompt logprobs go through the LM head this many rows at a time: a long prompt's whole
# [tokens, vocab] logits at once would be gigabytes for a large vocabulary.
PROMPT_LOGPROBS_ROWS = 256


@dataclass(frozen=True)
class TokenEvent:
    """One generated token as the request's stream sees it; the last event carries finish_reason."""

    token_id: int
    text: str  # newly stable text (may be empty while a character or a stop string is pending)
    index: int  # 1-based count of generated tokens
    finish_reason: str | None = None  # "stop" | "length" when this is the last event
    prompt_tokens: int = 0
    # Of the prompt tokens, those whose keys and values came from the prefix cache.
    cached_tokens: int = 0
    completion_tokens: int = 0
    logprobs: TokenLogprobs | None = None  # when the request asked for them
    # On the first event of a request that asked: one per prompt token (None for the first).
    prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None


Sink = Callable[[TokenEvent | BaseException], None]


@dataclass
class Sequence:
    """One request's state inside the scheduler."""

    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    revision: str | None
    sink: Sink
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_len: int
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    kv_slot: int = -1
    lora_slot: int = -1
    waited_for_adapter: bool = False  # its revision was loading or had no slot when first asked
    emitted: int = 0  # characters of detok.text already sent
    cancelled: bool = False
    finished: bool = False
    # Told of a cancel (the scheduler's queue of cancelled requests, set when it is queued), so
    # that a step looks at the cancelled requests only, not at every waiting one.
    on_cancel: Callable[[Sequence], None] | None = field(default=None, repr=False)
    queued: bool = False  # in the scheduler's waiting queue
    arrival: int = 0  # its place in the order the scheduler was handed requests
    queued_forks: int = 0  # requests queued as forks of this one (fork_of), still waiting
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    prefilled: int = 0  # prompt tokens in the KV cache (a long prompt takes several steps)
    cached: int = 0  # of those, the ones copied from the prefix cache at admission
    chunk: int = 0  # prompt tokens this step prefills
    # Prompt logprobs gathered chunk by chunk (None for the first token), until the prompt ends.
    prompt_lps: list[TokenLogprobs | None] = field(default_factory=list)
    # A request with the same prompt, revision and prompt logprobs queued just before this one
    # (an `n` choices group): admitted in the same step, this sequence copies its prompt's KV
    # instead of prefilling it again. Cleared once used or not usable.
    fork_of: Sequence | None = None
    stop_floor: int = 0  # characters of text no stop string may end in (min_tokens)
    # A structured output (params.structured): its compiled grammar, shared by the requests of
    # its spec; the llguidance matcher copied from it for this output (it masks each step's
    # logits, takes each sampled token, and says when the output is complete); and what
    # compiles the grammar afresh once its shared lexer is full (Grammars.renew).
    grammar: Any = None
    matcher: Any = None
    renew_grammar: Callable[[Any], Any] | None = None
    # What its penalties look at (params.adjusts_logits), kept from step to step; made at its
    # first sampled step, on the logits' device.
    penalties: PenaltyHistory | None = None
    _hashes: list[int] | None = field(default=None, init=False, repr=False)
    # The token ids that end this sequence: EOS (unless ignored) and its stop token ids.
    stop_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        eos = frozenset() if self.params.ignore_eos else self.eos_ids
        self.stop_ids = eos | frozenset(self.params.stop_token_ids)

    def cancel(self) -> None:
        """Mark it cancelled and tell the scheduler; takes no lock (a garbage collector's callback may call it)."""
        self.cancelled = True
        notify = self.on_cancel
        if notify is not None:
            notify(self)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def cache_owner(self) -> Owner:
        """Whose cached keys and values this sequence may share: its revision's, with its salt."""
        return self.revision, self.params.cache_salt

    @property
    def prompt_hashes(self) -> list[int]:
        """The prefix cache's chain hashes of the prompt's whole blocks (computed once)."""
        if self._hashes is None:
            self._hashes = block_hashes(self.cache_owner, self.prompt_ids)
        return self._hashes

    def kv_tokens(self) -> list[int]:
        """The tokens whose keys and values are in the sequence's KV slot."""
        if self.prefilled < len(self.prompt_ids):
            return self.prompt_ids[: self.prefilled]
        # The last sampled token has not been through the model yet.
        return self.prompt_ids + self.output_ids[:-1]

    def renew_worn_matcher(self) -> bool:
        """Whether a matcher that failed on its grammar's full lexer (worn_out()) was replaced by a
        copy of the grammar compiled afresh, which has taken the output so far. A renewal that
        fails is not tried again: the request then fails with its matcher's own error."""
        if self.renew_grammar is None or not self.matcher.is_error():
            return False
        if not worn_out(matcher_error(self.matcher)):
            return False
        worn = self.grammar
        # Twice at most: the fresh compile cached by another request may have filled already.
        for _ in range(2):
            try:
                # A compile in the step stalls the batch once per wear-out; failing instead
                # would end every running request of the spec.
                grammar = self.renew_grammar(worn)
            except Exception:
                log.exception("request %d: its worn grammar did not compile again", self.request_id)
                break
            matcher = grammar.deep_copy()
            if matcher.consume_tokens(self.output_ids):
                log.info("request %d: its grammar's lexer was full; renewed", self.request_id)
                self.grammar, self.matcher = grammar, matcher
                return True
            if not (matcher.is_error() and worn_out(matcher_error(matcher))):
                break
            worn = grammar
        self.renew_grammar = None
        return False

    def takes(self, token: int) -> bool:
        """Whether the structured output's matcher takes `token` (renewed first if it wore out
        on this token; a matcher whose mask failed gave no mask to draw `token` from)."""
        if self.matcher.is_error():
            return False
        if self.matcher.consume_token(token):
            return True
        return self.renew_worn_matcher() and bool(self.matcher.consume_token(token))

    def append(
        self,
        token: int,
        logprobs: TokenLogprobs | None = None,
        prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None,
    ) -> TokenEvent:
        """Record a sampled token and decide whether the sequence is finished."""
        self.output_ids.append(token)
        # A structured output whose grammar takes no further token is complete: it stops here,
        # not one step later on the EOS that would be the only token left (min_tokens or not).
        complete = self.matcher is not None and self.matcher.is_stopped()
        may_stop = len(self.output_ids) > self.params.min_tokens
        # As vLLM: a stop token ends the output without its own text (EOS, or an ordinary
        # token named in stop_token_ids), so no stop string is looked for in that text; also
        # when it is what completes a grammar (an EOS ending `[0-9]+`: no `</s>` in the text).
        stop_token = token in self.stop_ids and (may_stop or complete)
        if not stop_token:
            self.detok.add(token)
        reason: str | None = None
        if stop_token or complete:
            reason = "stop"
        elif (
            self.params.max_tokens is not None and len(self.output_ids) >= self.params.max_tokens
        ) or self.num_tokens >= self.max_len:
            reason = "length"
        if reason is not None:
            # A character left unfinished is kept as decoded (U+FFFD), as tokenizer.decode does.
            self.detok.flush()
        text = self.detok.text
        cut = len(text)
        stops = self.params.stop
        if not may_stop:
            # The text of the first min_tokens tokens: a stop string must end past it (vLLM's).
            self.stop_floor = len(text)
        elif stops:
            at = find_stop(text, stops, max(self.emitted, self.stop_floor))
            if at != -1:
                reason, cut = "stop", at
        if stops and reason is None:
            # Hold back a tail that could still grow into a stop string, within min_tokens too:
            # a stop string may begin in those tokens' text as long as it ends past it, and is
            # then cut from where it begins, so that text must not have been sent yet.
            cut = stop_tail_start(text, stops, self.emitted)
        delta = text[self.emitted : cut]
        self.emitted = max(self.emitted, cut)
        if reason is not None:
            self.finished = True
        return TokenEvent(
            token_id=token,
            text=delta,
            index=len(self.output_ids),
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            cached_tokens=self.cached,
            completion_tokens=len(self.output_ids),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class WaitQueue:
    """The requests waiting to start, in arrival order, counted per revision.

    A step takes requests from its head (popleft) as far as it admits and puts back in front the
    ones it passes over; a request that leaves from elsewhere (cancelled) is counted out at once
    and its entry dropped when a step reaches it. No step then costs a pass over a backlog.
    """

    def __init__(self) -> None:
        self._entries: deque[Sequence] = deque()  # the queued ones and entries left behind
        self._queued = 0  # read by other threads (the engine's max_waiting and gauges)
        self.per_revision: Counter[str | None] = Counter()

    def __len__(self) -> int:
        return self._queued

    def __bool__(self) -> bool:
        return self._queued > 0

    def __iter__(self) -> Iterator[Sequence]:
        return (s for s in list(self._entries) if s.queued)

    def append(self, seq: Sequence) -> None:
        """Queue `seq` behind the others."""
        seq.queued = True
        if seq.fork_of is not None:
            seq.fork_of.queued_forks += 1
        self._entries.append(seq)
        self._queued += 1
        self.per_revision[seq.revision] += 1

    def leave(self, seq: Sequence) -> None:
        """Count `seq` out (admitted, failed or cancelled); its entry goes when a step reaches it."""
        seq.queued = False
        if seq.fork_of is not None:
            seq.fork_of.queued_forks -= 1
        self._queued -= 1
        self.per_revision[seq.revision] -= 1
        if not self.per_revision[seq.revision]:
            del self.per_revision[seq.revision]
        # Entries left behind at the front go now (each once): an idle engine must not keep
        # the cancelled requests' sequences alive until the next request comes.
        entries = self._entries
        while entries and not entries[0].queued:
            entries.popleft()

    def popleft(self) -> Sequence:
        """Take the oldest queued request off the front (it stays counted until it leaves)."""
        while True:
            seq = self._entries.popleft()
            if seq.queued:
                return seq

    def put_back(self, passed: list[Sequence]) -> None:
        """Put the requests a step took and passed over back in front, in their order."""
        self._entries.extendleft(reversed(passed))


@dataclass
class SchedulerStats:
    """Counters for /metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    last_batch_size: int = 0
    batch_size_sum: int = 0
    sampling_steps: int = 0  # steps that sampled (not only prompt chunks): batch_size_sum's count
    step_seconds_total: float = 0.0


def _shared_blocks(seq: Sequence, going_in: dict[int, int], scored: int | None) -> int:
    """How many of seq's leading prompt blocks (short of its last token) are going in with
    what seq needs of them (their logprobs, when it is scored)."""
    usable = (len(seq.prompt_ids) - 1) // BLOCK
    need = -1 if scored is None else scored
    n = 0
    for h in seq.prompt_hashes[:usable]:
        if going_in.get(h, -2) < need:
            break
        n += 1
    return n


def _slot_order(seq: Sequence) -> int:
    return seq.lora_slot if seq.lora_slot >= 0 else 1 << 30


class Scheduler:
    """Owns the model, KV cache and sequences; `step()` runs one iteration. Single-threaded by design."""

    def __init__(
        self,
        model: Model,
        kv: KVCache,
        residency: Residency | None,
        *,
        max_num_batched_tokens: int = 4096,
        kernel_backend: Backend = "auto",
        graphs: DecodeGraphs | None = None,
        prefix_caching: bool = True,
    ) -> None:
        self.model = model
        self.graphs = graphs  # decode-only steps replay from these; steps with prefills run eagerly
        self.kv = kv
        self.prefix = PrefixCache(kv, enabled=prefix_caching)  # hands out the KV slots
        self.residency = residency
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kernel_backend = kernel_backend
        self.waiting = WaitQueue()
        # Requests cancelled since the last step (Sequence.cancel, from any thread: a deque's
        # append and popleft are atomic), so that no step looks for them among all the waiting.
        self.cancelled: deque[Sequence] = deque()
        # Requests that ended since the engine last took them (it forgets their ids).
        self.done: list[Sequence] = []
        self._arrivals = 0  # requests handed to add() so far
        # Per revision, the arrivals before which a waiting request counts as having waited for
        # its adapter: a step that stops at a backlog stalled on adapters marks it this way.
        self._stalled_before: dict[str, int] = {}
        self.running: list[Sequence] = []
        # Admitted, holding a KV slot, their prompt not all in the cache yet (chunked prefill).
        self.prefilling: list[Sequence] = []
        # Sampled for the first time in this step: neither waiting nor (yet) running.
        self.admitting: list[Sequence] = []
        self.stats = SchedulerStats()
        self.failed_steps_in_a_row = 0  # reset by a step that succeeds
        self.last_error: str | None = None

    @property
    def has_work(self) -> bool:
        """Whether any request is queued, being prefilled or running."""
        return bool(self.waiting or self.prefilling or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request; it joins the batch at a later step."""
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.waiting.append(seq)
        seq.on_cancel = self.cancelled.append
        if seq.cancelled:  # cancelled before it got here (a cancel now tells the queue itself)
            self.cancelled.append(seq)

    def _finish(self, seq: Sequence, *, kv_valid: bool = True) -> None:
        if seq.kv_slot >= 0:
            if kv_valid:  # kept for later prompts that start with the same tokens
                self.prefix.retire(seq.kv_slot, seq.cache_owner, seq.kv_tokens())
            else:
                self.prefix.release(seq.kv_slot)
            seq.kv_slot = -1
        if seq.lora_slot >= 0:
            assert self.residency is not None
            self.residency.release(seq.lora_slot)
            seq.lora_slot = -1
        seq.finished = True
        self.done.append(seq)

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        self._finish(seq, kv_valid=False)  # a failed step may have written part of its KV
        self.stats.failed += 1
        _deliver(seq, err)

    def _reap_cancelled(self) -> None:
        reaped = []
        for group in (self.running, self.prefilling):
            for seq in [s for s in group if s.cancelled]:
                group.remove(seq)
                self._finish(seq)
                reaped.append(seq)
        gone = []
        while self.cancelled:
            seq = self.cancelled.popleft()
            if seq.queued:  # the others were running (reaped above) or have ended
                self.waiting.leave(seq)
                seq.finished = True
                self.done.append(seq)
                gone.append(seq)
        reaped += gone
        self._undrain(gone)
        for seq in reaped:
            self.stats.cancelled += 1
            # Its last word, so that whoever waits on it learns it ended. A consumer that
            # cancelled it has stopped listening, and a sink that failed was why: both may raise.
            with suppress(Exception):
                seq.sink(RequestCancelled(f"request {seq.request_id} was cancelled"))

    def _undrain(self, gone: list[Sequence]) -> None:
        """Give up the adapter slot drains that waiting requests now `gone` may have asked for,
        for each revision no request still waiting asks for: a drain left for nobody would hold
        up the requests for the revision in that slot until all its running ones end."""
        if self.residency is None:
            return
        revisions = {s.revision for s in gone if self._waited(s) and s.revision is not None}
        for revision in revisions:
            if not self.waiting.per_revision[revision]:
                self.residency.undrain(revision)

    def _waited(self, seq: Sequence) -> bool:
        """Whether seq's revision was loading or had no slot when a step first asked for it."""
        if seq.waited_for_adapter:
            return True
        return seq.revision is not None and seq.arrival < self._stalled_before.get(seq.revision, 0)

    def _plan(self) -> list[Sequence]:
        """This step's prompt work within max_num_batched_tokens: the next chunk of each prompt
        under way, then new requests in FIFO order (seq.chunk set; a fork's is 0)."""
        budget = self.max_num_batched_tokens
        planned: list[Sequence] = []
        for seq in self.prefilling:
            if budget == 0:
                break
            seq.chunk = min(len(seq.prompt_ids) - seq.prefilled, budget)
            budget -= seq.chunk
            planned.append(seq)
        ending = {id(p): p for p in planned if p.prefilled + p.chunk == len(p.prompt_ids)}
        # Blocks of the prompts going in, not yet in the cache: a prompt that shares more of
        # them than the cache holds waits a step for them instead of computing them again.
        going_in: dict[int, int] = {}
        for seq in self.prefilling:
            self._going_in(seq, going_in)
        # Revisions with no adapter slot this step (loading, or every slot busy): the requests
        # behind them wait too, without a lookup each.
        stalled: set[str] = set()
        # Waiting requests are taken from the head of the queue, as far as this step admits;
        # those passed over go back in front at the end, in their order: no step costs a pass
        # over the whole backlog, nor a rebuild of the queue per admission.
        waiting = self.waiting
        passed: list[Sequence] = []
        passed_per_revision: Counter[str | None] = Counter()

        def pass_over(seq: Sequence) -> None:
            passed.append(seq)
            passed_per_revision[seq.revision] += 1

        while len(waiting) > len(passed) and self.prefix.available > 0:
            if stalled and budget > 0:
                # Stop once every request left asks for a revision with no slot (each would be
                # passed over), counting them as having waited for their adapter.
                left = len(waiting) - len(passed)
                per_revision = waiting.per_revision
                if left == sum(per_revision[r] - passed_per_revision[r] for r in stalled):
                    for revision in stalled:
                        self._stalled_before[revision] = self._arrivals
                    break
            seq = waiting.popleft()
            # A fork whose parent's prompt ends in this step shares its prefill (at no cost to
            # the budget). While the parent waits or is still prefilling, so does the fork;
            # once the parent is gone (running, failed), the fork prefills on its own.
            parent = seq.fork_of
            if parent is not None and id(parent) not in ending:
                if not parent.finished and parent.prefilled < len(parent.prompt_ids):
                    pass_over(seq)
                    continue
                parent.queued_forks -= 1
                seq.fork_of = None
            if seq.fork_of is None and budget == 0:
                pass_over(seq)
                if not any(p.queued_forks for p in ending.values()):
                    break  # no prompt tokens left, and no fork can join a parent this step
                continue  # only forks still get in
            if seq.revision in stalled:
                seq.waited_for_adapter = True
                pass_over(seq)
                continue
            hit = None
            if seq.fork_of is None:
                scored = seq.params.prompt_logprobs
                hit = self.prefix.lookup(
                    seq.cache_owner, seq.prompt_ids, hashes=seq.prompt_hashes, scored=scored
                )
                if _shared_blocks(seq, going_in, scored) * BLOCK > hit.length + BLOCK:
                    # A prompt going in holds more of it: wait a step, then copy. Nobody
                    # younger goes first meanwhile: one that did could take the last KV slot,
                    # or drain this one's adapter slot, and keep it waiting a whole generation.
                    # Forks joining a parent that ends in this step still get in (no budget).
                    budget = 0
                    pass_over(seq)
                    if not any(p.queued_forks for p in ending.values()):
                        break
                    continue
            if seq.revision is not None:
                assert self.residency is not None
                try:
                    slot = self.residency.acquire(seq.revision, waited=self._waited(seq))
                except Exception as err:
                    waiting.leave(seq)
                    self._fail(seq, err)
                    continue
                if slot is None:
                    seq.waited_for_adapter = True
                    stalled.add(seq.revision)
                    pass_over(seq)
                    continue  # its adapter is loading or every slot is busy: wait, do not fail
                seq.lora_slot = slot
            waiting.leave(seq)
            if hit is None:
                seq.kv_slot = self.prefix.allocate()
            else:
                seq.kv_slot = self.prefix.admit(seq.cache_owner, seq.prompt_ids, hit)
                seq.prefilled = seq.cached = hit.length
                if hit.logprobs is not None:
                    seq.prompt_lps = list(hit.logprobs)
                self._going_in(seq, going_in)
            seq.chunk = (
                0 if seq.fork_of is not None else min(len(seq.prompt_ids) - seq.prefilled, budget)
            )
            budget -= seq.chunk
            planned.append(seq)
            if seq.fork_of is None:
                self.prefilling.append(seq)
                if seq.prefilled + seq.chunk == len(seq.prompt_ids):
                    ending[id(seq)] = seq
        waiting.put_back(passed)
        return planned

    def _going_in(self, seq: Sequence, going_in: dict[int, int]) -> None:
        """Add seq's prompt blocks to those going in, each with the most prompt-logprob
        alternatives a prompt holding it keeps (-1: none)."""
        if not self.prefix.enabled:
            return
        top = -1 if seq.params.prompt_logprobs is None else seq.params.prompt_logprobs
        for h in seq.prompt_hashes:
            going_in[h] = max(going_in.get(h, -1), top)

    def step(self) -> bool:
        """Run one iteration; return False when there was nothing to run."""
        self._reap_cancelled()
        planned = self._plan()
        chunked = [s for s in planned if s.fork_of is None]
        # Sampled this step: the running sequences and each prompt that ends in this step.
        # Ordered by adapter slot (base-only last), stably: each slot's tokens then form one
        # contiguous run, so the LoRA ops work on row slices instead of gathering and scattering.
        # A new list, not a sort in place: a list being sorted reads as empty to the threads
        # that count it meanwhile (snapshot(), for /metrics).
        self.running = sorted(self.running, key=_slot_order)
        chunked.sort(key=_slot_order)
        ending = [s for s in chunked if s.prefilled + s.chunk == len(s.prompt_ids)]
        forks = [s for s in planned if s.fork_of is not None]
        admitted = self.admitting = sorted([*ending, *forks], key=_slot_order)
        seqs = self.running + admitted
        if not seqs and not chunked:
            return False
        started = time.perf_counter()
        decodes = [
            (s.output_ids[-1], s.num_tokens - 1, s.kv_slot, s.lora_slot) for s in self.running
        ]
        prefills = [
            (s.prompt_ids[s.prefilled : s.prefilled + s.chunk], s.kv_slot, s.lora_slot)
            for s in chunked
        ]
        device = self.model.device
        used = {s.lora_slot for s in [*seqs, *chunked] if s.lora_slot >= 0}
        graphs = self.graphs
        scored = [i for i, s in enumerate(chunked) if s.params.prompt_logprobs is not None]
        unsampled = {i for i, s in enumerate(chunked) if not any(s is e for e in ending)}
        prompt_logprobs: dict[int, tuple[TokenLogprobs | None, ...]] = {}
        try:
            logits = None
            if graphs is not None and not prefills:
                logits = graphs.run(decodes, lora=bool(used))  # None: run this step eagerly
            if logits is None:
                batch = StepBatch.build(
                    decodes,
                    prefills,
                    device,
                    scored=scored,
                    starts=[s.prefilled for s in chunked],
                    unsampled=unsampled,
                )
                lora = None
                if used:
                    assert self.residency is not None
                    lora = self.residency.pools.batch(
                        batch.token_lora_slots, used, self.kernel_backend
                    )
                if batch.seq_rows is not None:
                    hidden = self.model.hidden(batch, self.kv, lora)
                    logits = self.model.head(hidden[batch.seq_rows])
                    for i in scored:
                        seq = chunked[i]
                        first = batch.scored_rows[i]
                        found = self._prompt_logprobs(hidden[first : first + seq.chunk], seq)
                        if i not in unsampled:
                            prompt_logprobs[seq.request_id] = found
                else:
                    logits = self.model.forward(batch, self.kv, lora)
            if forks:
                logits = self._fork(logits, forks, prompt_logprobs)
            tokens, stuck = self._sample(logits, seqs)
            left_no_token = {id(seqs[i]) for i in stuck}
            logprobs = self._logprobs(logits, seqs, tokens)
        except Exception as err:
            # A failed step must not take the engine down: fail this batch, keep serving.
            # Distinct requests: a prompt ending in this step is both sampled and prefilled.
            failed = list({id(s): s for s in [*seqs, *chunked]}.values())
            log.error("an engine step of %d sequences failed", len(failed), exc_info=err)
            # Counted before anyone hears of it: a client told of the failure may ask /health.
            self.failed_steps_in_a_row += 1
            self.last_error = f"{type(err).__name__}: {err}"
            for seq in failed:
                if not seq.finished:
                    self._fail(seq, err)
            self.prefilling = [s for s in self.prefilling if not s.finished]
            self.running = self.admitting = []
            return True
        self.failed_steps_in_a_row = 0
        for seq in chunked:
            seq.prefilled += seq.chunk
            if seq.prefilled == len(seq.prompt_ids):  # its prompt can now serve later ones
                top = seq.params.prompt_logprobs
                self.prefix.publish(
                    seq.kv_slot,
                    seq.cache_owner,
                    seq.prompt_ids,
                    None if top is None else tuple(seq.prompt_lps),
                    top or 0,
                    seq.prompt_hashes,
                )
        self.prefilling = [s for s in self.prefilling if s.prefilled < len(s.prompt_ids)]
        # Counted before any event goes out: a client that reads /metrics after its answer
        # must find its own tokens there.
        s = self.stats
        s.steps += 1
        s.prefill_tokens += sum(seq.chunk for seq in chunked)
        s.generated_tokens += len(seqs)
        if seqs:  # a step of prompt chunks only samples nothing: it is no batch size
            s.sampling_steps += 1
            s.last_batch_size = len(seqs)
            s.batch_size_sum += len(seqs)
        # Built aside and put in place at once: snapshot() reads these lists from other
        # threads, and a list refilled in place would show some running requests as gone.
        running: list[Sequence] = []
        for seq, token, token_lp in zip(seqs, tokens, logprobs, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = time.monotonic()
            # A matcher whose mask failed (a parser limit met mid-output) allowed only the end
            # of the output: that is a failure to report, not a finished answer.
            try:
                if id(seq) in left_no_token:
                    self._fail(seq, _no_token_left(seq))
                    continue
                if seq.matcher is not None and not seq.takes(token):
                    self._fail(seq, _structured_failure(seq))
                    continue
                event = seq.append(token, token_lp, prompt_logprobs.get(seq.request_id))
            except Exception as err:
                # This request's own bookkeeping (its detokenizer, its stop strings) failed:
                # it fails alone, and the engine's thread goes on with the others.
                log.error("request %d failed after its step", seq.request_id, exc_info=err)
                self._fail(seq, err)
                continue
            if seq.finished:
                self._finish(seq)
                self.stats.finished += 1
            else:
                running.append(seq)
            _deliver(seq, event)
        self.running = running
        self.admitting = []
        s.step_seconds_total += time.perf_counter() - started
        return True

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], set[int]]:
        """The token of each sequence, and the indices of those left no token to draw (their
        constraints together allow none)."""
        # Structured outputs' masks first: on a GPU they are computed on the CPU while the
        # step's kernels still run (nothing before them waits for the logits).
        structured = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if structured:
            on_cpu = logits.device.type == "cpu"
            bits = token_bitmask(
                [seqs[i].matcher for i in structured], logits.shape[1], parallel=not on_cpu
            )
            for row, i in enumerate(structured):
                if seqs[i].renew_worn_matcher():  # its mask failed on a full lexer: again
                    bits[row] = token_bitmask([seqs[i].matcher], logits.shape[1])[0]
            blocked = blocked_tokens(bits, logits.shape[1], logits.device)
        if logits.device.type == "cpu":
            # numpy's argmax is ~10x faster than torch's on a [32, vocab] CPU tensor; both
            # return the first maximum (and the first NaN), so the tokens are the same.
            out: list[int] = logits.numpy().argmax(axis=-1).tolist()
        else:
            out = logits.argmax(dim=-1).tolist()
        # The rows a penalty, a bias or a structured output changes, in one matrix (a copy:
        # logprobs are of the raw logits).
        changed = [
            i for i, s in enumerate(seqs) if s.params.adjusts_logits or s.matcher is not None
        ]
        work = None
        stuck: set[int] = set()
        if changed:
            device = logits.device
            work = logits[torch.tensor(changed, device=device)].float()
            for j, i in enumerate(changed):
                seq = seqs[i]
                if seq.params.adjusts_logits:
                    if seq.penalties is None:
                        seq.penalties = PenaltyHistory(seq.prompt_ids, logits.shape[1], device)
                    work[j] = adjust_logits(
                        logits[i],
                        seq.params,
                        seq.prompt_ids,
                        seq.output_ids,
                        seq.stop_ids,
                        seq.penalties,
                    )
            if structured:
                stuck = self._mask(work, logits, changed, structured, blocked, seqs)
            greedy = [j for j, i in enumerate(changed) if seqs[i].params.greedy]
            if greedy:
                picked = work[torch.tensor(greedy, device=device)].argmax(dim=-1).tolist()
                for j, token in zip(greedy, picked, strict=True):
                    out[changed[j]] = token
        generators = {
            i: s.generator
            for i, s in enumerate(seqs)
            if s.generator is not None and not s.params.greedy
        }
        drawn = list(generators)
        if drawn:
            if work is not None and drawn == changed:  # e.g. every request sampled and constrained
                rows = work
            else:
                rows = logits[torch.tensor(drawn, device=logits.device)]
                at = {i: j for j, i in enumerate(changed)}
                pairs = [(k, at[i]) for k, i in enumerate(drawn) if i in at]
                if pairs:
                    assert work is not None
                    into, source = zip(*pairs, strict=True)
                    rows[list(into)] = work[list(source)].to(rows.dtype)
            tokens = sample_rows(
                rows,
                [seqs[i].params for i in drawn],
                list(generators.values()),
            )
            for i, token in zip(drawn, tokens, strict=True):
                out[i] = token
        return out, stuck

    @staticmethod
    def _mask(
        work: torch.Tensor,
        logits: torch.Tensor,
        changed: list[int],
        structured: list[int],
        blocked: torch.Tensor,
        seqs: list[Sequence],
    ) -> set[int]:
        """Set, in `work` (the changed rows), every token a structured output does not allow
        next (`blocked`, on the logits' device) to -inf, as one batched op; the indices (in
        `seqs`) of the rows their own constraints and the structured output leave no token."""
        if len(structured) == len(changed):  # the usual case: every changed row is constrained
            rows = None
            work.masked_fill_(blocked, -math.inf)
        else:
            at = {i: j for j, i in enumerate(changed)}
            rows = torch.tensor([at[i] for i in structured], device=logits.device)
            work[rows] = work[rows].masked_fill(blocked, -math.inf)
        stuck: set[int] = set()
        if any(seqs[i].params.adjusts_logits for i in structured):
            part = work if rows is None else work[rows]
            empty = ~torch.isfinite(part).any(dim=-1)
            if bool(empty.any()):
                # min_tokens barred EOS where the grammar allows nothing else: the grammar wins
                # over min_tokens (only its bar is lifted), never over allowed_token_ids.
                for row in empty.nonzero().flatten().tolist():
                    i = structured[row]
                    seq = seqs[i]
                    if not seq.params.adjusts_logits:
                        continue  # a failed matcher's row: its sampled token fails it
                    if seq.params.min_tokens:
                        lifted = adjust_logits(
                            logits[i],
                            replace(seq.params, min_tokens=0),
                            seq.prompt_ids,
                            seq.output_ids,
                            seq.stop_ids,
                            seq.penalties,
                        ).masked_fill_(blocked[row], -math.inf)
                        part[row] = lifted
                    if not bool(torch.isfinite(part[row]).any()):
                        stuck.add(i)
                        part[row] = 0.0  # any token to draw: the request fails before taking it
                if rows is not None:
                    work[rows] = part
        return stuck

    def _fork(
        self,
        logits: torch.Tensor,
        forks: list[Sequence],
        prompt_logprobs: dict[int, tuple[TokenLogprobs | None, ...]],
    ) -> torch.Tensor:
        """Give each fork its parent's prompt KV, logits row and prompt logprobs; the logits of every sequence of the step, in order."""
        sampled = [s for s in self.admitting if s.fork_of is None]
        rows = {id(s): i for i, s in enumerate([*self.running, *sampled])}
        for seq in forks:
            parent = seq.fork_of
            assert parent is not None
            self.kv.copy_prefix(parent.kv_slot, seq.kv_slot, len(seq.prompt_ids))
            seq.prefilled = len(seq.prompt_ids)
            seq.cached = parent.cached
            if parent.request_id in prompt_logprobs:
                prompt_logprobs[seq.request_id] = prompt_logprobs[parent.request_id]
            rows[id(seq)] = rows[id(parent)]
            seq.fork_of = None
        order = [rows[id(s)] for s in [*self.running, *self.admitting]]
        return logits[torch.tensor(order, dtype=torch.long, device=logits.device)]

    def _logprobs(
        self, logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]
    ) -> list[TokenLogprobs | None]:
        """Each sampled token's logprobs, for the sequences that asked (one batched pass)."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(seqs)
        if not rows:
            return out
        top = max(seqs[i].params.logprobs or 0 for i in rows)
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        found = token_logprobs(logits[index], [tokens[i] for i in rows], top)
        for i, lp in zip(rows, found, strict=True):
            wanted = seqs[i].params.logprobs or 0
            out[i] = lp.keep_top(wanted)
        return out

    def _prompt_logprobs(
        self, hidden: torch.Tensor, seq: Sequence
    ) -> tuple[TokenLogprobs | None, ...]:
        """Add the logprobs this chunk's hidden states give (each row predicts the next prompt
        token) to the sequence's, a few rows at a time; all of them once the prompt ends."""
        top = seq.params.prompt_logprobs or 0
        offset = seq.prefilled
        targets = seq.prompt_ids[offset + 1 : offset + 1 + seq.chunk]
        found = seq.prompt_lps
        if offset == 0:
            found.append(None)  # the first token: nothing predicts it
        hidden = hidden[: len(targets)]  # a prompt's last row predicts the first output token
        for start in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
            end = start + PROMPT_LOGPROBS_ROWS
            logits = self.model.head(hidden[start:end])
            found.extend(token_logprobs(logits, targets[start:end], top))
        return tuple(found)

    def snapshot(self) -> dict[str, Any]:
        """Queue depth and running count."""
        # A prompt ending in this step is both admitting and (until the step ends) prefilling.
        running = len({id(s) for s in [*self.running, *self.admitting, *self.prefilling]})
        return {"waiting": len(self.waiting), "running": running}


def _structured_failure(seq: Sequence) -> StructuredOutputError:
    """The error of a sequence whose sampled token its structured output refused."""
    assert seq.params.structured is not None  # the matcher's spec
    reason = matcher_error(seq.matcher) or "no token could continue the output"
    log.info("request %d: its structured output failed: %s", seq.request_id, reason)
    return StructuredOutputError(
        f"the output could not continue under its {seq.params.structured.kind} structured "
        f"output after {len(seq.output_ids)} tokens: {reason}"
    )


def _no_token_left(seq: Sequence) -> StructuredOutputError:
    """The error of a sequence whose allowed_token_ids and structured output allow no token in common."""
    assert seq.params.structured is not None  # only a structured row can be left empty
    reason = matcher_error(seq.matcher)
    if reason:
        return _structured_failure(seq)
    log.info(
        "request %d: allowed_token_ids and its structured output leave no token", seq.request_id
    )
    return StructuredOutputError(
        f"allowed_token_ids and the {seq.params.structured.kind} structured output leave no "
        f"token to continue the output after {len(seq.output_ids)} tokens"
    )


class RequestCancelled(MintError):
    """The request was cancelled (Engine.cancel) before it finished."""


def _deliver(seq: Sequence, item: Any) -> None:
    """Hand an event or error to the request's sink; a sink that raises cancels its request, not the engine."""
    try:
        seq.sink(item)
    except Exception:
        log.exception("request %d: its sink failed; cancelling it", seq.request_id)
        seq.cancel()
