"""Continuous batching at iteration level: every step admits waiting requests (prefill), decodes the
running ones, and retires the finished, with requests for different adapters in one batch."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mintvcs.serve.graphs import DecodeGraphs
from mintvcs.serve.kv_cache import KVCache
from mintvcs.serve.model import Model, StepBatch
from mintvcs.serve.sampling import (
    IncrementalDetokenizer,
    SamplingParams,
    TokenLogprobs,
    adjust_logits,
    find_stop,
    sample_rows,
    token_logprobs,
)
from mintvcs.serve.slots import Residency

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
    emitted: int = 0  # characters of detok.text already sent
    cancelled: bool = False
    finished: bool = False
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    # A request with the same prompt, revision and prompt logprobs queued just before this one
    # (an `n` choices group): admitted in the same step, this sequence copies its prompt's KV
    # instead of prefilling it again. Cleared once used or not usable.
    fork_of: Sequence | None = None
    stop_floor: int = 0  # characters of text no stop string may end in (min_tokens)
    # The token ids that end this sequence: EOS (unless ignored) and its stop token ids.
    stop_ids: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        eos = frozenset() if self.params.ignore_eos else self.eos_ids
        self.stop_ids = eos | frozenset(self.params.stop_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def append(
        self,
        token: int,
        logprobs: TokenLogprobs | None = None,
        prompt_logprobs: tuple[TokenLogprobs | None, ...] | None = None,
    ) -> TokenEvent:
        """Record a sampled token and decide whether the sequence is finished."""
        self.output_ids.append(token)
        self.detok.add(token)
        text = self.detok.text
        reason: str | None = None
        cut = len(text)
        stops = self.params.stop
        may_stop = len(self.output_ids) > self.params.min_tokens
        if not may_stop:
            # The text of the first min_tokens tokens: a stop string must end past it (vLLM's).
            self.stop_floor = len(text)
        elif stops:
            at = find_stop(text, stops, max(self.emitted, self.stop_floor))
            if at != -1:
                reason, cut = "stop", at
        if reason is None:
            if may_stop and token in self.stop_ids:
                reason = "stop"
            elif (
                self.params.max_tokens is not None
                and len(self.output_ids) >= self.params.max_tokens
            ) or self.num_tokens >= self.max_len:
                reason = "length"
            if reason is not None:
                text = self.detok.flush()
                cut = len(text)
        if reason is None and stops:
            # Hold back a tail that could still grow into a stop string.
            cut = max(self.emitted, len(text) - max(len(s) for s in stops) + 1)
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
            completion_tokens=len(self.output_ids),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


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
    step_seconds_total: float = 0.0


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
        kernel_backend: str = "auto",
        graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.graphs = graphs  # decode-only steps replay from these; steps with prefills run eagerly
        self.kv = kv
        self.residency = residency
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kernel_backend = kernel_backend
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Admitted this step and being prefilled: neither waiting nor (yet) running.
        self.admitting: list[Sequence] = []
        self.stats = SchedulerStats()
        self.failed_steps_in_a_row = 0  # reset by a step that succeeds
        self.last_error: str | None = None

    @property
    def has_work(self) -> bool:
        """Whether any request is queued or running."""
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a request; it joins the batch at a later step."""
        self.waiting.append(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.kv_slot >= 0:
            self.kv.free(seq.kv_slot)
            seq.kv_slot = -1
        if seq.lora_slot >= 0:
            assert self.residency is not None
            self.residency.release(seq.lora_slot)
            seq.lora_slot = -1
        seq.finished = True

    def _fail(self, seq: Sequence, err: BaseException) -> None:
        self._finish(seq)
        self.stats.failed += 1
        _deliver(seq, err)

    def _reap_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self.running.remove(seq)
            self._finish(seq)
            self.stats.cancelled += 1
        if any(s.cancelled for s in self.waiting):
            for seq in [s for s in self.waiting if s.cancelled]:
                self.stats.cancelled += 1
                seq.finished = True
            self.waiting = deque(s for s in self.waiting if not s.cancelled)

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_num_batched_tokens
        for seq in list(self.waiting):
            if self.kv.free_slots == 0:
                break
            # A fork whose parent is admitted in this step shares its prefill: no prompt tokens.
            # While the parent waits (its adapter loading), so does the fork; once the parent is
            # gone (admitted before, failed), the fork prefills on its own.
            parent = seq.fork_of
            if parent is not None and not any(parent is a for a in admitted):
                if not parent.finished and any(parent is w for w in self.waiting):
                    continue
                seq.fork_of = None
            n = 0 if seq.fork_of is not None else len(seq.prompt_ids)
            if n > budget and (admitted or self.running):
                break  # FIFO: a long prompt waits for a step with room rather than being overtaken forever
            if seq.revision is not None:
                assert self.residency is not None
                try:
                    slot = self.residency.acquire(seq.revision)
                except Exception as err:
                    self.waiting.remove(seq)
                    self._fail(seq, err)
                    continue
                if slot is None:
                    continue  # its adapter is loading or every slot is busy: wait, do not fail
                seq.lora_slot = slot
            seq.kv_slot = self.kv.allocate()
            self.waiting.remove(seq)
            admitted.append(seq)
            budget -= n
        return admitted

    def step(self) -> bool:
        """Run one iteration; return False when there was nothing to run."""
        self._reap_cancelled()
        admitted = self.admitting = self._admit()
        # Order by adapter slot (base-only last), stably: each slot's tokens then form one
        # contiguous run, so the LoRA ops work on row slices instead of gathering and scattering.
        self.running.sort(key=_slot_order)
        admitted.sort(key=_slot_order)
        seqs = self.running + admitted
        if not seqs:
            return False
        started = time.perf_counter()
        decodes = [
            (s.output_ids[-1], s.num_tokens - 1, s.kv_slot, s.lora_slot) for s in self.running
        ]
        prefilled = [s for s in admitted if s.fork_of is None]
        forks = [s for s in admitted if s.fork_of is not None]
        prefills = [(s.prompt_ids, s.kv_slot, s.lora_slot) for s in prefilled]
        device = self.model.device
        used = {s.lora_slot for s in seqs if s.lora_slot >= 0}
        graphs = self.graphs
        scored = [i for i, s in enumerate(prefilled) if s.params.prompt_logprobs is not None]
        prompt_logprobs: dict[int, tuple[TokenLogprobs | None, ...]] = {}
        try:
            logits = None
            if graphs is not None and not prefills:
                logits = graphs.run(decodes, lora=bool(used))  # None: run this step eagerly
            if logits is None:
                batch = StepBatch.build(decodes, prefills, device, scored=scored)
                lora = None
                if used:
                    assert self.residency is not None
                    lora = self.residency.pools.batch(
                        batch.token_lora_slots, used, self.kernel_backend
                    )
                if scored:
                    hidden = self.model.hidden(batch, self.kv, lora)
                    assert batch.seq_rows is not None
                    logits = self.model.head(hidden[batch.seq_rows])
                    for i in scored:
                        seq = prefilled[i]
                        last = batch.seq_rows[len(decodes) + i]
                        first = last - len(seq.prompt_ids) + 1
                        prompt_logprobs[seq.request_id] = self._prompt_logprobs(
                            hidden[first:last], seq
                        )
                else:
                    logits = self.model.forward(batch, self.kv, lora)
            if forks:
                logits = self._fork(logits, forks, prefilled, prompt_logprobs)
            tokens = self._sample(logits, seqs)
            logprobs = self._logprobs(logits, seqs, tokens)
        except Exception as err:
            # A failed step must not take the engine down: fail this batch, keep serving.
            log.error("an engine step of %d sequences failed", len(seqs), exc_info=err)
            for seq in seqs:
                self._fail(seq, err)
            self.running = self.admitting = []
            self.failed_steps_in_a_row += 1
            self.last_error = f"{type(err).__name__}: {err}"
            return True
        self.failed_steps_in_a_row = 0
        self.running = []
        for seq, token, token_lp in zip(seqs, tokens, logprobs, strict=True):
            if seq.first_token_at is None:
                seq.first_token_at = time.monotonic()
            event = seq.append(token, token_lp, prompt_logprobs.get(seq.request_id))
            if seq.finished:
                self._finish(seq)
                self.stats.finished += 1
            else:
                self.running.append(seq)
            _deliver(seq, event)
        self.admitting = []
        s = self.stats
        s.steps += 1
        s.prefill_tokens += sum(len(p[0]) for p in prefills)
        s.generated_tokens += len(seqs)
        s.last_batch_size = len(seqs)
        s.batch_size_sum += len(seqs)
        s.step_seconds_total += time.perf_counter() - started
        return True

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        if logits.device.type == "cpu":
            # numpy's argmax is ~10x faster than torch's on a [32, vocab] CPU tensor; both
            # return the first maximum (and the first NaN), so the tokens are the same.
            out: list[int] = logits.numpy().argmax(axis=-1).tolist()
        else:
            out = logits.argmax(dim=-1).tolist()
        adjusted: dict[int, torch.Tensor] = {}
        for i, seq in enumerate(seqs):
            if seq.params.adjusts_logits:
                row = adjust_logits(
                    logits[i], seq.params, seq.prompt_ids, seq.output_ids, seq.stop_ids
                )
                adjusted[i] = row
                if seq.params.greedy:
                    out[i] = int(torch.argmax(row))
        drawn = [i for i, s in enumerate(seqs) if s.generator is not None and not s.params.greedy]
        if drawn:
            rows = logits[torch.tensor(drawn, device=logits.device)]
            for j, i in enumerate(drawn):
                if i in adjusted:
                    rows[j] = adjusted[i]
            tokens = sample_rows(
                rows,
                [seqs[i].params for i in drawn],
                [seqs[i].generator for i in drawn],
            )
            for i, token in zip(drawn, tokens, strict=True):
                out[i] = token
        return out

    def _fork(
        self,
        logits: torch.Tensor,
        forks: list[Sequence],
        prefilled: list[Sequence],
        prompt_logprobs: dict[int, tuple[TokenLogprobs | None, ...]],
    ) -> torch.Tensor:
        """Give each fork its parent's prompt KV, logits row and prompt logprobs; the logits of every sequence of the step, in order."""
        rows = {id(s): i for i, s in enumerate([*self.running, *prefilled])}
        for seq in forks:
            parent = seq.fork_of
            assert parent is not None
            self.kv.copy_prefix(parent.kv_slot, seq.kv_slot, len(seq.prompt_ids))
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
            out[i] = lp if len(lp.top) == wanted else replace(lp, top=lp.top[:wanted])
        return out

    def _prompt_logprobs(
        self, hidden: torch.Tensor, seq: Sequence
    ) -> tuple[TokenLogprobs | None, ...]:
        """Logprobs of prompt tokens 1.. from the hidden states of tokens 0..n-2, a few rows at a time."""
        top = seq.params.prompt_logprobs or 0
        targets = seq.prompt_ids[1:]
        found: list[TokenLogprobs | None] = [None]
        for start in range(0, len(targets), PROMPT_LOGPROBS_ROWS):
            end = start + PROMPT_LOGPROBS_ROWS
            logits = self.model.head(hidden[start:end])
            found.extend(token_logprobs(logits, targets[start:end], top))
        return tuple(found)

    def snapshot(self) -> dict[str, Any]:
        """Queue depth and running count."""
        return {"waiting": len(self.waiting), "running": len(self.running) + len(self.admitting)}


def _deliver(seq: Sequence, item: Any) -> None:
    """Hand an event or error to the request's sink; a sink that raises cancels its request, not the engine."""
    try:
        seq.sink(item)
    except Exception:
        log.exception("request %d: its sink failed; cancelling it", seq.request_id)
        seq.cancelled = True
