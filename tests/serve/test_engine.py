"""The engine against PEFT's own generate, and batching, eviction, waiting and cancellation."""

from __future__ import annotations

import asyncio
import gc
import json
import re
import threading
import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, InvalidRequest, PeftDirSource, SamplingParams
from mintvcs.serve.adapters import AdapterRefused
from mintvcs.serve.engine import EngineClosed, EngineError
from mintvcs.serve.loader import CheckpointError, UnsupportedModelError
from mintvcs.serve.scheduler import RequestCancelled, Sequence, TokenEvent
from mintvcs.serve.slots import ResidencyError
from tests.fixtures import ALL_LINEAR
from tests.serve.conftest import ZOO

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize("name", ["qv-r8", "all-r16", "all-r4-rslora", "mlp-r2", "o-r6", None])
def test_greedy_tokens_equal_peft_generate(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path], name: str | None
) -> None:
    prompt = _prompt(1, 17)
    ours = engine.generate(prompt, name, GREEDY, timeout=60).token_ids
    assert ours == _peft_greedy(tiny_base, zoo[name] if name else None, prompt, GREEDY.max_tokens)


def test_rank_and_alpha_patterns_match_peft_by_module_path(tiny_base: Path, tmp_path: Path) -> None:
    # PEFT matches pattern keys against the module's path (model.layers.0.self_attn.v_proj), so
    # keys may name the parent (self_attn./mlp.) or one layer: each must scale as PEFT scales it.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(ALL_LINEAR),
        rank_pattern={"mlp.up_proj": 2},
        alpha_pattern={
            "self_attn.v_proj": 64,
            "mlp.down_proj": 1,
            "model.layers.1.self_attn.q_proj": 40,
        },
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_base)), config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = tmp_path / "patterns"
    model.save_pretrained(str(adapter), safe_serialization=True)
    prompt = _prompt(4, 11)
    with Engine(
        tiny_base, EngineConfig(max_model_len=128), source=PeftDirSource({"p": adapter})
    ) as eng:
        ours = eng.generate(prompt, "p", GREEDY, timeout=60).token_ids
    assert ours == _peft_greedy(tiny_base, adapter, prompt, GREEDY.max_tokens)


def test_bf16_adapter_equals_peft(tiny_base: Path, peft_adapter_bf16: Path) -> None:
    with Engine(
        tiny_base,
        EngineConfig(max_model_len=128),
        source=PeftDirSource({"bf16": peft_adapter_bf16}),
    ) as eng:
        prompt = _prompt(2, 9)
        assert eng.generate(prompt, "bf16", GREEDY, timeout=60).token_ids == _peft_greedy(
            tiny_base, peft_adapter_bf16, prompt, GREEDY.max_tokens
        )


def _mixed_requests() -> list[tuple[list[int], str | None, SamplingParams]]:
    names: list[str | None] = [*ZOO, None, None]
    reqs = []
    for i, name in enumerate(names * 2):
        params = (
            GREEDY
            if i % 3
            else SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        )
        reqs.append((_prompt(100 + i, 3 + 5 * i % 40), name, params))
    return reqs


def test_mixed_batch_equals_each_request_alone(engine: Engine) -> None:
    reqs = _mixed_requests()
    before = engine.stats()["steps"]
    together = engine.generate_many(reqs, timeout=120)
    assert engine.stats()["mean_batch_size"] > 1
    alone = [engine.generate(*req, timeout=60) for req in reqs]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # Different adapters really do give different outputs for one prompt.
    same_prompt = [engine.generate(reqs[0][0], name, GREEDY).token_ids for name in [*ZOO, None]]
    assert len({tuple(t) for t in same_prompt}) == len(same_prompt)
    assert engine.stats()["steps"] > before


def test_eviction_and_reload_give_the_same_outputs(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path]
) -> None:
    reqs = _mixed_requests()
    expected = [c.token_ids for c in engine.generate_many(reqs, timeout=120)]
    config = EngineConfig(
        max_batch_size=16, adapter_slots=2, max_model_len=256, host_cache_bytes=40_000
    )
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as small:
        got = [c.token_ids for c in small.generate_many(reqs, timeout=120)]
        again = [c.token_ids for c in small.generate_many(list(reversed(reqs)), timeout=120)]
        stats = small.stats()
    assert got == expected
    assert list(reversed(again)) == expected
    assert stats["evictions"] >= 6
    assert stats["host_evictions"] >= 1  # the host cache is bounded too
    assert stats["requests_failed"] == 0


def test_requests_wait_for_a_busy_slot(tiny_base: Path, zoo: dict[str, Path]) -> None:
    """One slot, two adapters: the second request queues behind the first instead of failing."""
    config = EngineConfig(max_batch_size=4, adapter_slots=1, max_model_len=256)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        first, second = eng.start_many(
            [(_prompt(3, 5), "qv-r8", long), (_prompt(4, 5), "mlp-r2", GREEDY)]
        )
        deadline = time.monotonic() + 30
        while eng.stats()["steps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not second.done()
        assert eng.stats()["queue_depth"] == 1
        assert first.result(60).finish_reason == "length"
        assert (
            second.result(60).token_ids == eng.generate(_prompt(4, 5), "mlp-r2", GREEDY).token_ids
        )
        assert eng.stats()["evictions"] == 1


def test_max_waiting_refuses_past_the_bound_all_or_nothing(tiny_base: Path) -> None:
    """One running request, max_waiting=2: two more wait, the next is refused; cancelling frees room."""
    from mintvcs.serve.engine import EngineOverloaded

    config = EngineConfig(max_batch_size=1, max_model_len=256, max_waiting=2)
    long = SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config) as eng:
        running = eng.start_many([(_prompt(3, 5), None, long)])[0]
        deadline = time.monotonic() + 30
        while eng.stats()["running"] < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        # A batch larger than the bound could never wait: not "retry later" but a bad request.
        with pytest.raises(InvalidRequest, match="more than the 2 that may wait"):
            eng.start_many([(_prompt(4, 5), None, long)] * 3)
        assert eng.waiting == 0 and len(eng._seqs) == 1
        waiting = eng.start_many([(_prompt(4, 5), None, long)])
        # A batch that would overflow the bound queues none of its requests; the refusal
        # counts choices (sequences), as the bound does.
        told = "1 choice(s) (sequences) already wait to start and this request adds 2; at most 2"
        with pytest.raises(EngineOverloaded, match=re.escape(told)):
            eng.start_many([(_prompt(5, 5), None, long)] * 2)
        assert eng.waiting == 1 and len(eng._seqs) == 2
        waiting += eng.start_many([(_prompt(5, 5), None, long)])
        # Once the step thread has moved them from its inbox to the scheduler, they still count.
        deadline = time.monotonic() + 30
        while eng._inbox.qsize() or len(eng.scheduler.waiting) < 2:
            assert time.monotonic() < deadline, eng.stats()
            time.sleep(0.005)
        with pytest.raises(EngineOverloaded, match=r"2 choice\(s\) \(sequences\) already wait"):
            eng.start_many([(_prompt(6, 5), None, GREEDY)])
        assert eng.stats()["queue_depth"] == 2
        for future in [running, *waiting]:
            future.cancel()
        _settled(eng)
        assert eng.generate([5, 6], None, GREEDY, timeout=30).finish_reason == "length"
    with pytest.raises(EngineError, match="max_waiting"):
        EngineConfig(max_waiting=0)


def test_a_request_cancelled_while_it_waits_leaves_the_queue_at_once(tiny_base: Path) -> None:
    # One KV slot, busy for 150 tokens: the second request waits, and cancelling it takes it
    # out of the queue (counted cancelled) before the first ends, not once it got a slot.
    config = EngineConfig(max_batch_size=1, max_model_len=256)
    with Engine(tiny_base, config) as eng:
        long = SamplingParams(max_tokens=150, temperature=0.0, ignore_eos=True)
        first, second = eng.start_many([(_prompt(3, 5), None, long), (_prompt(4, 5), None, long)])
        deadline = time.monotonic() + 30
        while eng.stats()["steps"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert eng.stats()["queue_depth"] == 1
        assert second.cancel()
        while eng.stats()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.005)
        stats = eng.stats()
        assert not first.done(), "the first request ended before the second was reaped"
        assert stats["queue_depth"] == 0 and stats["requests_cancelled"] == 1
        assert first.result(60).finish_reason == "length"


def test_cancel_frees_the_sequence_and_slot_ref(engine: Engine) -> None:
    async def main() -> tuple[int, dict[str, Any]]:
        stream = engine.submit(
            _prompt(5, 6),
            "all-r16",
            SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
        )
        seen = 0
        async for _event in stream:
            seen += 1
            if seen == 3:
                break
        slot = engine.residency.slot_of("all-r16")
        assert slot is not None and engine.residency.slots[slot].refs == 1
        await stream.aclose()
        for _ in range(500):
            if engine.residency.slots[slot].refs == 0 and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return seen, engine.stats()

    seen, stats = asyncio.run(main())
    assert seen == 3
    slot = engine.residency.slot_of("all-r16")
    assert slot is not None and engine.residency.slots[slot].refs == 0
    assert stats["running"] == 0 and stats["kv_slots_free"] == engine.config.max_batch_size
    assert stats["requests_cancelled"] >= 1


@pytest.mark.parametrize("how", ["break", "never iterated"])
def test_a_stream_dropped_unfinished_cancels_its_request(engine: Engine, how: str) -> None:
    # Nothing but the caller refers to a stream: dropped unfinished (a `break` out of
    # `async for`, as vLLM's generate allows), it used to run to max_model_len, holding its
    # KV slot and adapter reference, while its events piled up unread.
    endless = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)

    async def main() -> dict[str, Any]:
        if how == "break":
            async for _event in engine.submit(_prompt(5, 6), "all-r16", endless):
                break
        else:
            engine.submit(_prompt(5, 6), "all-r16", endless)
        # Settled with the loop still running: its closing would cancel the request anyway.
        for _ in range(3000):
            if not engine._seqs:
                break
            await asyncio.sleep(0.01)
        return engine.stats()

    before = engine.stats()
    stats = asyncio.run(main())
    assert stats["requests_cancelled"] == before["requests_cancelled"] + 1
    assert stats["requests_finished"] == before["requests_finished"]  # not run to the end
    assert stats["running"] == 0 and stats["kv_slots_free"] == engine.config.max_batch_size
    slot = engine.residency.slot_of("all-r16")
    assert slot is not None and engine.residency.slots[slot].refs == 0


@pytest.mark.parametrize("stream", [True, False])
def test_requests_whose_event_loop_closed_are_cancelled(engine: Engine, stream: bool) -> None:
    # Streams kept, their loop closed (a notebook's helper loop, asyncio.run's end) with an
    # event delivery already scheduled on it: the requests ran to max_model_len, and every
    # later event piled up in the engine for good.
    endless = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    loop = asyncio.new_event_loop()

    async def submit() -> list[Any]:
        return engine.submit_many(
            [(_prompt(i, 6), "qv-r8", endless) for i in (1, 2)], stream=stream
        )

    before = engine.stats()
    kept = loop.run_until_complete(submit())
    deadline = time.monotonic() + 30
    while engine.stats()["generated_tokens"] < before["generated_tokens"] + 8:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    loop.close()
    stats = _settled(engine)
    assert not engine._seqs
    assert stats["requests_cancelled"] == before["requests_cancelled"] + 2
    assert stats["requests_finished"] == before["requests_finished"]  # not run to the end
    assert stats["running"] == 0 and stats["kv_slots_free"] == engine.config.max_batch_size
    box = engine._mailboxes.get(loop)
    assert box is None or not box._items  # nothing held for a loop that is gone
    del kept


def test_the_engine_keeps_no_mailbox_of_a_closed_loop(engine: Engine) -> None:
    # One asyncio.run() per item (an evaluation script) kept one mailbox, and so one closed
    # loop, per call: the mailbox refers to its loop, which held its weak key alive.
    async def one(i: int) -> None:
        async for _event in engine.stream([5, i], None, SamplingParams(max_tokens=1)):
            pass

    for i in range(5):
        asyncio.run(one(i + 6))
    assert len(engine._mailboxes) <= 1


def _settled(engine: Engine) -> dict[str, Any]:
    # Not the running and waiting counts: a request being prefilled is in neither for a step.
    for _ in range(500):
        if not engine._seqs:
            break
        time.sleep(0.01)
    return engine.stats()


def test_cancelling_a_future_cancels_its_request_and_the_engine_lives(engine: Engine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    cancelled_before = engine.stats()["requests_cancelled"]
    future = engine.start_many([(_prompt(7, 5), "all-r16", long)])[0]
    time.sleep(0.05)
    assert future.cancel() or future.done()
    stats = _settled(engine)
    assert stats["running"] == 0 and stats["requests_cancelled"] > cancelled_before
    assert engine._thread is not None and engine._thread.is_alive()
    assert len(engine.generate([5, 6], None, GREEDY, timeout=30).token_ids) == GREEDY.max_tokens


def test_a_timeout_cancels_what_it_gave_up_on(engine: Engine) -> None:
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    cancelled_before = engine.stats()["requests_cancelled"]
    with pytest.raises(TimeoutError):
        engine.generate_many([(_prompt(8, 5), None, long), (_prompt(9, 5), "qv-r8", long)], 0.01)
    stats = _settled(engine)
    assert stats["requests_cancelled"] == cancelled_before + 2  # not run to the end
    assert stats["running"] == 0 and stats["kv_slots_free"] == engine.config.max_batch_size


def test_a_refused_batch_queues_none_of_its_requests(engine: Engine) -> None:
    before = len(engine._seqs)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.generate_many([([5, 6], None, GREEDY), ([10_000], None, GREEDY)])
    assert len(engine._seqs) == before


def test_task_cancellation_cancels_the_request(engine: Engine) -> None:
    """A consumer task cancelled mid-await (a client disconnect) cancels the request."""

    async def consume(decoding: asyncio.Event) -> None:
        async for _ in engine.stream(
            _prompt(6, 4), "kv-r12", SamplingParams(max_tokens=200, ignore_eos=True)
        ):
            await asyncio.sleep(0)
            decoding.set()

    async def main() -> int:
        before = engine.stats()["requests_cancelled"]
        decoding = asyncio.Event()
        task = asyncio.create_task(consume(decoding))
        # Cancelled once it decodes, not after a fixed 0.2 s: its 200 tokens took 0.6-0.8 s
        # on a small VM, so a machine a few times as fast would have had nothing to cancel.
        await decoding.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):
            if engine.stats()["requests_cancelled"] > before and engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        return int(engine.stats()["requests_cancelled"] - before)

    assert asyncio.run(main()) == 1
    slot = engine.residency.slot_of("kv-r12")
    assert slot is not None and engine.residency.slots[slot].refs == 0


def test_stream_events_and_text(engine: Engine) -> None:
    async def main() -> list[object]:
        return [
            e
            async for e in engine.stream(
                "Hello world", None, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
            )
        ]

    events = asyncio.run(main())
    assert [e.index for e in events] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert [e.finish_reason for e in events] == [None] * 4 + ["length"]  # type: ignore[attr-defined]
    ids = [e.token_id for e in events]  # type: ignore[attr-defined]
    assert "".join(e.text for e in events) == engine.tokenizer.decode(ids)  # type: ignore[attr-defined]


def test_unstreamed_submit_wakes_the_loop_twice(engine: Engine) -> None:
    """stream=False: the same events, but only the first and one batch of the rest reach the loop."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main(stream: bool) -> tuple[list[TokenEvent], int]:
        box = engine._mailbox(asyncio.get_running_loop())
        posts = 0
        post = box.post

        def counting(target: asyncio.Queue[object], item: object) -> bool:
            nonlocal posts
            posts += 1
            return post(target, item)

        box.post = counting  # type: ignore[method-assign]
        try:
            events = [e async for e in engine.submit("Hello world", "qv-r8", params, stream=stream)]
        finally:
            del box.post
        return events, posts

    streamed, streamed_posts = asyncio.run(main(True))
    batched, batched_posts = asyncio.run(main(False))
    assert batched == streamed and len(batched) == 12
    assert (streamed_posts, batched_posts) == (12, 2)


def test_a_request_whose_bookkeeping_fails_fails_alone(engine: Engine) -> None:
    # Past validation (a bug, say): its stop check raised outside the step's guard, which ended
    # the engine's thread and left every other request waiting for ever.
    broken = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    object.__setattr__(broken, "stop", ("a", 1))
    fine = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = engine.generate([5, 6, 7], None, fine, timeout=30)

    async def both() -> tuple[list[Any], list[Any]]:
        streams = engine.submit_many([([5, 6, 7], None, broken), ([5, 6, 7], None, fine)])
        results: list[list[Any]] = [[], []]
        for i, stream in enumerate(streams):
            try:
                async for event in stream:
                    results[i].append(event.token_id)
            except TypeError as err:
                results[i].append(err)
        return results[0], results[1]

    failed, ok = asyncio.run(asyncio.wait_for(both(), 30))
    assert isinstance(failed[-1], TypeError)
    assert ok == alone.token_ids
    assert engine.problem() is None
    assert engine.generate([5, 6, 7], None, fine, timeout=30).token_ids == alone.token_ids


def test_stop_string_eos_and_seeded_sampling(engine: Engine) -> None:
    free = engine.generate(
        "The answer", None, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    )
    assert len(free.text) > 6
    stop = free.text[3:6]
    cut = engine.generate(
        "The answer",
        None,
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,)),
    )
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.index(stop)]
    plain = engine.generate(
        [5, 6, 7], None, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ).token_ids
    stop_id = plain[len(plain) // 2]
    ended = engine.generate(
        [5, 6, 7], None, SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(stop_id,))
    )
    assert ended.finish_reason == "stop"
    assert ended.token_ids == plain[: plain.index(stop_id) + 1]
    # As vLLM: the stop token's own text is left out (it was kept).
    before = engine.tokenizer.decode(plain[: plain.index(stop_id)], skip_special_tokens=True)
    assert ended.text == before
    # A stop string that ends inside the stop token's text does not apply: that text is not
    # output (it cut the output there, dropping its last character, or kept part of the token).
    decoded = engine.tokenizer.decode(plain[: plain.index(stop_id) + 1], skip_special_tokens=True)
    across = before[-1:] + decoded[len(before) :][:1]
    assert len(across) == 2 and across not in before
    crossed = engine.generate(
        [5, 6, 7],
        None,
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=(stop_id,), stop=(across,)),
    )
    assert (crossed.text, crossed.token_ids) == (before, ended.token_ids)
    # A temperature so small that logits / temperature overflow is greedy (it sampled the
    # last token of the vocabulary every step).
    tiny = SamplingParams(max_tokens=12, temperature=1e-40, seed=1, ignore_eos=True)
    assert engine.generate([5, 6, 7], None, tiny).token_ids == plain[:12]
    seeded = SamplingParams(max_tokens=20, temperature=1.5, seed=42, ignore_eos=True)
    a, b = engine.generate([5, 6, 7], "qv-r8", seeded), engine.generate([5, 6, 7], "qv-r8", seeded)
    c = engine.generate(
        [5, 6, 7], "qv-r8", SamplingParams(max_tokens=20, temperature=1.5, seed=43, ignore_eos=True)
    )
    assert a.token_ids == b.token_ids != c.token_ids


def test_invalid_requests_are_refused_up_front(engine: Engine) -> None:
    with pytest.raises(InvalidRequest, match="empty"):
        engine.generate([], None, GREEDY)
    with pytest.raises(InvalidRequest, match="vocabulary"):
        engine.generate([10_000], None, GREEDY)
    with pytest.raises(InvalidRequest, match="max_model_len"):
        engine.generate([5] * 300, None, GREEDY)


def test_misused_calls_are_refused_with_what_was_expected(engine: Engine) -> None:
    # Each used to give a silent wrong answer or an error from deep inside the engine.
    # (The engine is the module's: an earlier test's requests may still be leaving it.)
    earlier = set(engine._seqs)
    with pytest.raises(TypeError, match="a str or a list of int token ids, not bytes"):
        engine.generate(b"hi", None, GREEDY)  # read as the token ids [104, 105]
    with pytest.raises(TypeError, match=r"it holds 1\.7 \(float\)"):
        engine.generate([1.7, 2.2], None, GREEDY)  # truncated to [1, 2]
    with pytest.raises(TypeError, match=r"each request is a \(prompt, revision, SamplingParams"):
        engine.generate_many(["Hi", "there"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="params must be a SamplingParams or None, not dict"):
        engine.generate([5, 6], None, {"max_tokens": 2})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="a revision is a str or None, not int"):
        engine.generate_many([([5, 6], 3, GREEDY)])  # type: ignore[list-item]
    assert set(engine._seqs) <= earlier  # none of those calls left a request behind
    assert len(engine.generate(np.array([5, 6]), None, GREEDY).token_ids) == 12  # type: ignore[arg-type]
    # vLLM's and OpenAI's form of logit_bias: a mapping, kept as pairs.
    assert SamplingParams(logit_bias={5: 1.0, 7: -2}).logit_bias == ((5, 1.0), (7, -2.0))
    with pytest.raises(InvalidRequest, match="logit_bias token id 100000"):
        engine.generate([5, 6], None, SamplingParams(logit_bias={100_000: 1.0}))  # type: ignore[arg-type]
    long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    with pytest.raises(TimeoutError, match=r"^2 of 2 requests had not finished after 0\.01 s"):
        engine.generate_many([([5, 6], None, long), ([7, 8], None, long)], timeout=0.01)


def test_engine_config_refuses_what_it_cannot_run() -> None:
    for value in (0, 1, -5):  # 0 silently meant the default, -5 failed inside the model
        with pytest.raises(EngineError, match=f"max_model_len must be at least 2 .*got {value}"):
            EngineConfig(max_model_len=value)
    with pytest.raises(EngineError, match="host_cache_bytes must be at least 0"):
        EngineConfig(host_cache_bytes=-1)
    with pytest.raises(
        EngineError, match="kernel_backend 'bogus' is not one of auto, torch, triton"
    ):
        EngineConfig(kernel_backend="bogus")  # type: ignore[arg-type]
    assert EngineConfig(dtype=torch.bfloat16).dtype == "bfloat16"  # type: ignore[arg-type]


def test_length_is_capped_by_max_model_len(engine: Engine) -> None:
    out = engine.generate(
        [5] * 250, None, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    )
    assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_slot_hits_and_misses_count_each_admission_once(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=128)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        for name in ("mlp-r2", "mlp-r2", "o-r6", "mlp-r2", "o-r6"):
            eng.generate([5, 6], name, GREEDY, timeout=30)
        stats = eng.stats()
        assert (stats["slot_hits"], stats["slot_misses"]) == (3, 2)
        # Two requests at once for a revision that is not resident: both wait for one load.
        eng.generate_many([([5, 6], "kv-r12", GREEDY), ([7, 8], "kv-r12", GREEDY)], 30)
        stats = eng.stats()
        assert (stats["slot_hits"], stats["slot_misses"], stats["load_count"]) == (3, 4, 3)


def test_a_pin_taken_while_every_slot_is_busy_takes_a_slot_once_one_is_idle(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=256)
    long = SamplingParams(max_tokens=120, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:

        async def busy() -> int | None:
            streams = eng.submit_many([([5, 6], "mlp-r2", long), ([5, 6], "o-r6", long)])
            for stream in streams:  # both admitted: each holds a slot
                await stream.__anext__()
            slot = await eng.warm("kv-r12", pin=True)
            for stream in streams:
                async for _ in stream:
                    pass
            return slot

        assert asyncio.run(busy()) is None  # only the host cache could take it then
        assert eng.residency_snapshot()["pinned"] == ["kv-r12"]
        deadline = time.monotonic() + 30
        # It stayed in the host cache, invisible in the slots, until a request named it.
        while not any(
            s["revision"] == "kv-r12" and s["pinned"] and s["state"] == "ready"
            for s in eng.residency_snapshot()["slots"]
        ):
            assert time.monotonic() < deadline, eng.residency_snapshot()
            time.sleep(0.02)


def test_a_slot_drained_for_a_waiting_request_is_not_taken_by_a_later_pin(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # Three slots busy (a short request on one, long ones on the others): a request for a
    # fourth revision reserves the short one's slot; a pin taken after that must not take
    # the slot when it falls idle, or the request would wait for the long ones to end.
    config = EngineConfig(max_batch_size=8, adapter_slots=3, max_model_len=256)
    short = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as eng:
        for revision in ("qv-r8", "mlp-r2", "o-r6"):
            eng.prefetch(revision).result(60)
        first = eng.start_many([([5, 6], "qv-r8", short)])
        _steps_until(eng, lambda: eng.stats()["running"] == 1)
        busy = eng.start_many([([5, 6], "mlp-r2", long), ([5, 7], "o-r6", long)])
        _steps_until(eng, lambda: eng.stats()["running"] == 3)
        waiter = eng.start_many([([5, 8], "kv-r12", short)])[0]
        eng._step()
        assert [s.draining_for for s in eng.residency.slots] == ["kv-r12", None, None]
        assert eng.prefetch("all-r16", pin=True).result(60) is None  # no slot: host cache only
        _steps_until(eng, waiter.done)
        assert first[0].done() and not any(f.done() for f in busy)
        assert waiter.result().finish_reason == "length"
        # The pin takes the next slot that falls idle.
        _steps_until(eng, lambda: all(f.done() for f in busy))
        _steps_until(eng, lambda: eng.residency.slot_of("all-r16") is not None)
        assert eng.residency_snapshot()["pinned"] == ["all-r16"]


def test_warm_pin_and_residency(tiny_base: Path, zoo: dict[str, Path]) -> None:
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=128)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        assert eng.prefetch("qv-r8", pin=True).result(30) is not None
        for name in ("mlp-r2", "o-r6", "kv-r12"):
            eng.generate([5, 6], name, GREEDY, timeout=30)
        snap = eng.residency_snapshot()
        revisions = {s["revision"] for s in snap["slots"]}
        assert "qv-r8" in revisions  # pinned: never evicted
        assert [s["pinned"] for s in snap["slots"] if s["revision"] == "qv-r8"] == [True]
        assert set(snap["host_cache"]["revisions"]) == {"qv-r8", "mlp-r2", "o-r6", "kv-r12"}
        stats = eng.stats()
        assert stats["evictions"] == 2 and stats["load_count"] == 4
        # A prefetch is no admission; each generate waited for its load: one miss each, no hit.
        assert (stats["slot_hits"], stats["slot_misses"]) == (0, 3)
        eng.unpin("qv-r8")
        eng.generate([5, 6], "mlp-r2", GREEDY, timeout=30)
        assert "qv-r8" not in {s["revision"] for s in eng.residency_snapshot()["slots"]}
        # From the host cache now: no new read of the source.
        loads = eng.stats()["store_loads"]
        eng.generate([5, 6], "qv-r8", GREEDY, timeout=30)
        assert eng.stats()["store_loads"] == loads and eng.stats()["host_hits"] >= 1


class _GatedSource(PeftDirSource):
    """A PEFT-directory source whose loads (of `gated` only, if given) wait for a gate: a slow
    disk, on demand."""

    def __init__(self, directories: dict[str, Path], gated: str | None = None) -> None:
        super().__init__(directories)
        self.gated = gated
        self.gate = threading.Event()

    def load(self, revision: str, *, max_bytes: int | None = None) -> Any:
        if self.gated in (None, revision):
            assert self.gate.wait(30)
        return super().load(revision, max_bytes=max_bytes)


def test_pins_taken_while_the_slots_are_busy_count_too(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    source = _GatedSource(zoo)
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=128)
    with Engine(tiny_base, config, source=source) as eng:
        busy = [eng.prefetch(name) for name in ("mlp-r2", "o-r6")]  # both slots loading
        pinned = eng.prefetch("qv-r8", pin=True)  # no slot free: the host cache, pinned
        # A second pin would leave no slot for anything else once both pins are loaded.
        with pytest.raises(ResidencyError, match="no slot for other revisions"):
            eng.prefetch("kv-r12", pin=True)
        source.gate.set()
        for future in (*busy, pinned):
            future.result(30)
        # Other revisions still get a slot.
        assert eng.generate([5, 6], "kv-r12", GREEDY, timeout=30).token_ids


def test_a_revision_waiting_for_a_slot_gets_it_while_another_has_steady_traffic(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    import threading

    config = EngineConfig(max_batch_size=4, adapter_slots=1, max_model_len=128)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        eng.generate([5, 6], "qv-r8", GREEDY, timeout=30)
        stop = threading.Event()
        steady: list[Any] = []

        def feed() -> None:  # six requests for qv-r8 outstanding at all times: never idle
            while not stop.is_set():
                if sum(not f.done() for f in steady) < 6:
                    steady.extend(eng.start_many([(_prompt(len(steady), 8), "qv-r8", GREEDY)]))
                time.sleep(0.002)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            time.sleep(0.3)
            waiting = eng.start_many([([7, 8, 9], "all-r16", GREEDY)])[0]
            # It used to be passed over for as long as qv-r8's requests kept coming.
            assert len(waiting.result(20).token_ids) == GREEDY.max_tokens
            assert feeder.is_alive()
        finally:
            stop.set()
            feeder.join()
        assert all(len(f.result(60).token_ids) == GREEDY.max_tokens for f in steady)


def test_a_pin_whose_load_is_refused_is_dropped(tiny_base: Path, zoo: dict[str, Path]) -> None:
    config = EngineConfig(max_batch_size=4, adapter_slots=3, max_lora_rank=8, max_model_len=128)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        # all-r16's file holds more bytes than rank 8 on every linear: refused before it is read.
        with pytest.raises(
            AdapterRefused,
            match=r"^revision all-r16 refused \(too_large\): \S+adapter_model\.safetensors holds "
            r"\d+ bytes, more than any adapter this engine serves \(\d+ bytes: max_lora_rank on "
            r"every targeted linear\)$",
        ) as info:
            eng.prefetch("all-r16", pin=True).result(30)
        assert info.value.reason == "too_large"
        assert eng.residency.pinned() == []
        # The refused pin used to count: the second pin below was refused with 2 of 3 slots free.
        assert eng.prefetch("qv-r8", pin=True).result(30) is not None
        assert eng.prefetch("mlp-r2", pin=True).result(30) is not None


def test_a_load_that_failed_is_retried_not_served_from_the_slot_it_freed(
    tiny_base: Path, zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failed load (not a refusal) frees its slot, and the next revision takes that slot. Once
    # the retry window has passed, the failed revision must be loaded again: were it still mapped
    # to its old slot, it would be served with the other revision's adapter.
    import shutil

    from mintvcs.serve import slots

    monkeypatch.setattr(slots, "_RETRY_AFTER_S", 0.2)
    late = tmp_path / "late"  # missing at first: a transient failure, retried after the window
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=128)
    prompt = _prompt(6, 9)
    with Engine(tiny_base, config, source=PeftDirSource({**zoo, "late": late})) as eng:
        with pytest.raises(Exception, match="late") as info:
            eng.generate(prompt, "late", GREEDY, timeout=30)
        assert not isinstance(info.value, AdapterRefused)
        assert eng.residency.slot_of("late") is None
        other = eng.generate(prompt, "qv-r8", GREEDY, timeout=30).token_ids
        shutil.copytree(zoo["mlp-r2"], late)
        time.sleep(0.3)
        got = eng.generate(prompt, "late", GREEDY, timeout=30).token_ids
        assert eng.stats()["loads_failed"] == 1
    want = _peft_greedy(tiny_base, zoo["mlp-r2"], prompt, GREEDY.max_tokens)
    assert want != other  # the two adapters tell apart on this prompt
    assert got == want


def test_a_refusal_is_final_past_the_retry_window(
    tiny_base: Path, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A refusal depends only on the revision's content: asking again, even after the window in
    # which a failed load is not retried, gets the same refusal without loading it again.
    from mintvcs.serve import slots

    monkeypatch.setattr(slots, "_RETRY_AFTER_S", 0.2)
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_lora_rank=8, max_model_len=128)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        reasons = []
        for _ in range(2):
            with pytest.raises(AdapterRefused, match="rank") as info:
                eng.generate([5, 6], "all-r16", GREEDY, timeout=30)  # r=16 over max_lora_rank 8
            reasons.append(info.value.reason)
            time.sleep(0.3)
        assert reasons == ["too_large"] * 2  # larger than any rank-8 revision: not even read
        assert eng.stats()["loads_failed"] == 1


def test_engine_cancel_ends_the_request_for_whoever_waits_on_it(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main(eng: Engine) -> list[TokenEvent]:
        stream = eng.submit(_prompt(3, 6), "qv-r8", long)
        seen = [await stream.__anext__()]
        eng.cancel(stream.request_id)
        with pytest.raises(RequestCancelled, match="was cancelled"):
            async with asyncio.timeout(20):  # it used to wait for ever
                async for event in stream:
                    seen.append(event)
        return seen

    with Engine(tiny_base, EngineConfig(max_model_len=256), source=PeftDirSource(zoo)) as eng:
        assert len(asyncio.run(main(eng))) < long.max_tokens
        assert eng.stats()["requests_cancelled"] == 1 and eng.stats()["kv_slots_free"] > 0


def test_warming_a_revision_the_host_cache_cannot_hold_is_an_error(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    source = _GatedSource(zoo)
    config = EngineConfig(
        max_batch_size=4, adapter_slots=1, max_model_len=128, host_cache_bytes=10_000
    )
    with Engine(tiny_base, config, source=source) as eng:
        busy = eng.prefetch("mlp-r2")  # the only slot: loading
        host_only = eng.prefetch("all-r16")
        source.gate.set()
        busy.result(30)
        with pytest.raises(ResidencyError, match=r"host cache .* cannot hold"):
            host_only.result(30)  # it used to answer None: "in the host cache"
        # Not the revision's fault: it is served at once, not refused for a while.
        assert len(eng.generate([5, 6], "all-r16", GREEDY, timeout=30).token_ids) == 12


def test_closing_fails_the_loads_queued_behind_another(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # A load queued behind another was cancelled by close() before it started, and the future
    # warm() handed out was never settled: `await engine.warm(...)` waited for ever.
    import threading

    source = _GatedSource(zoo)
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=128)
    eng = Engine(tiny_base, config, source=source)
    try:
        first = eng.prefetch("mlp-r2")  # loading, held at the gate
        queued = eng.prefetch("o-r6")  # the other slot, queued behind it
        host_only = eng.prefetch("qv-r8")  # no slot left: the host cache, queued too

        async def warm_queued() -> int | None:
            return await eng.warm("o-r6")

        closing = threading.Thread(target=eng.close)
        closing.start()
        deadline = time.monotonic() + 30
        while not eng.residency._closing and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.2)  # close() cancels the queued loads right after it marks itself closing
        source.gate.set()
        closing.join(30)
        assert not closing.is_alive()
        assert first.result(5) is not None  # the load in progress finished
        for future in (queued, host_only):
            with pytest.raises(ResidencyError, match="closed before this revision was loaded"):
                future.result(5)
        with pytest.raises(EngineClosed):
            asyncio.run(warm_queued())  # not RuntimeError from concurrent.futures
        with pytest.raises(EngineClosed):
            eng.prefetch("kv-r12")
    finally:
        source.gate.set()
        eng.close()


def test_warming_a_closing_residency_says_it_is_closed_not_a_conflict(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # A warm() that came after close() marked the residency closing raised a plain
    # ResidencyError: a 409 over HTTP, where a load queued at that moment got the 503 of
    # ResidencyClosed; and the scheduler's acquire() hit the shut executor's RuntimeError.
    from mintvcs.serve.slots import ResidencyClosed

    config = EngineConfig(max_batch_size=2, adapter_slots=2, max_model_len=64)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as eng:
        eng.residency.close()  # where Engine.close() stands once its step loop has stopped
        with pytest.raises(ResidencyClosed, match="closed"):
            eng.residency.warm("mlp-r2")
        with pytest.raises(ResidencyClosed, match="closed"):
            eng.residency.warm("o-r6", pin=True)
        with pytest.raises(ResidencyClosed, match="closed"):
            eng.residency.acquire("qv-r8")
        with pytest.raises(EngineClosed):  # the engine's own answer for a closing engine
            eng.prefetch("kv-r12")
        assert all(s["state"] == "free" for s in eng.residency.snapshot())


def test_a_source_whose_load_takes_no_max_bytes_is_refused_at_construction(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # Written to the protocol the docs showed, load(id): every request then failed with
    # "load() got an unexpected keyword argument 'max_bytes'".
    class OldSource:
        def resolve(self, spec: str) -> str:
            return spec

        def load(self, revision: str) -> Any:
            return PeftDirSource(zoo).load(revision)

    class Flexible(OldSource):
        def load(self, revision: str, **options: Any) -> Any:  # type: ignore[override]
            return PeftDirSource(zoo).load(revision, **options)

    config = EngineConfig(max_batch_size=2, adapter_slots=2, max_model_len=64)
    with pytest.raises(EngineError, match=r"OldSource\.load\(revision\) takes no max_bytes"):
        Engine(tiny_base, config, source=OldSource())  # type: ignore[arg-type]
    with Engine(tiny_base, config, source=Flexible()) as eng:  # type: ignore[arg-type]
        assert len(eng.generate([5, 6], "qv-r8", GREEDY, timeout=30).token_ids) == 12


def test_a_slow_load_does_not_stall_running_requests(tiny_base: Path, zoo: dict[str, Path]) -> None:
    source = _GatedSource(zoo)
    with Engine(
        tiny_base, EngineConfig(max_batch_size=8, adapter_slots=2, max_model_len=128), source=source
    ) as eng:
        slow = eng.start_many([(_prompt(7, 5), "all-r16", GREEDY)])[0]
        base = eng.generate_many([(_prompt(8 + i, 6), None, GREEDY) for i in range(3)], timeout=30)
        assert all(len(c.token_ids) == GREEDY.max_tokens for c in base)
        assert not slow.done()
        assert [s["state"] for s in eng.residency_snapshot()["slots"]].count("loading") == 1
        source.gate.set()
        assert len(slow.result(30).token_ids) == GREEDY.max_tokens


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_cuda_asked_for_without_cuda_is_a_clear_error() -> None:
    from mintvcs.serve.engine import EngineError

    with pytest.raises(EngineError, match="sees no CUDA device; use --device cpu or auto"):
        EngineConfig(device="cuda").torch_device()
    assert EngineConfig(device="auto").torch_device().type == "cpu"


def test_summary_names_what_the_engine_holds(engine: Engine) -> None:
    line = engine.summary()
    kv_gib = engine.kv.nbytes / 2**30
    assert f"KV cache {kv_gib:.2f} GiB for {engine.kv.num_slots} sequences" in line
    assert f"{engine.pools.num_slots} adapter slots" in line and "float32 on cpu" in line
    assert "prefix caching on" in line


def test_generation_config_eos_stops_generation(tiny_base: Path, tmp_path: Path) -> None:
    # Instruct models list their end-of-turn token in generation_config.json only.
    import shutil

    base = tmp_path / "instruct"
    shutil.copytree(tiny_base, base)
    prompt = _prompt(10, 6)
    with Engine(tiny_base, EngineConfig(max_model_len=64)) as eng:
        first = eng.generate(prompt, None, GREEDY).token_ids[0]
    (base / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, first]}))
    with Engine(base, EngineConfig(max_model_len=64)) as eng:
        out = eng.generate(prompt, None, SamplingParams(max_tokens=12, temperature=0.0))
        # ignore_eos (vLLM's, for benchmarks) runs past it to max_tokens, as the other base does.
        on = eng.generate(
            prompt, None, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        )
    assert out.finish_reason == "stop" and out.token_ids == [first]
    assert on.finish_reason == "length" and len(on.token_ids) == 12 and on.token_ids[0] == first


def test_max_model_len_beyond_the_trained_positions_is_refused(tiny_base: Path) -> None:
    from mintvcs.serve.engine import EngineError

    with pytest.raises(EngineError, match="beyond the 512 positions"):
        Engine(tiny_base, EngineConfig(max_model_len=4096), start=False)


def test_vllm_spellings_of_off_and_unbounded(engine: Engine) -> None:
    assert SamplingParams(top_k=-1).top_k == 0
    out = engine.generate(
        [5] * 250, None, SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    )
    assert out.finish_reason == "length" and len(out.token_ids) == 6  # the context's end


def test_choices_of_one_prompt_prefill_it_once_and_equal_each_alone(engine: Engine) -> None:
    prompt = _prompt(31, 21)
    other = _prompt(32, 9)
    choices = [
        (prompt, "all-r16", SamplingParams(max_tokens=8, temperature=0.9, seed=s, logprobs=1))
        for s in (1, 2, 3, 4)
    ]
    # Two groups of choices and a lone request between them, with requests already decoding.
    prefilled = engine.scheduler.stats.prefill_tokens
    before = engine.start_many([(other, "qv-r8", GREEDY), (other, None, GREEDY)])
    together = engine.generate_many(
        [*choices, (other, None, GREEDY), *[(prompt, None, GREEDY)] * 3], timeout=120
    )
    for future in before:
        future.result(60)
    # Each group's prompt once, the lone request's, and the two that were decoding.
    assert engine.scheduler.stats.prefill_tokens - prefilled == 2 * len(prompt) + 3 * len(other)
    for (request_prompt, name, params), got in zip(
        [*choices, (other, None, GREEDY), *[(prompt, None, GREEDY)] * 3], together, strict=True
    ):
        alone = engine.generate(request_prompt, name, params, timeout=60)
        assert got.token_ids == alone.token_ids
        if params.logprobs is not None:
            assert got.logprobs is not None and alone.logprobs is not None
            assert [lp.logprob for lp in got.logprobs] == pytest.approx(
                [lp.logprob for lp in alone.logprobs], abs=1e-4
            )
    assert len({tuple(c.token_ids) for c in together[:4]}) > 1  # different seeds, different draws


def test_a_choice_admitted_after_its_parent_prefills_itself(tiny_base: Path) -> None:
    # Two KV slots for three choices: the third waits, then is admitted alone and prefills.
    with Engine(tiny_base, EngineConfig(max_batch_size=2, max_model_len=128)) as small:
        prompt = _prompt(33, 15)
        params = [
            SamplingParams(max_tokens=5, temperature=1.0, seed=s, prompt_logprobs=1)
            for s in (7, 8, 9)
        ]
        together = small.generate_many([(prompt, None, p) for p in params], timeout=60)
        assert small.scheduler.stats.prefill_tokens == 2 * len(prompt)
        for p, got in zip(params, together, strict=True):
            alone = small.generate(prompt, None, p, timeout=60)
            assert got.token_ids == alone.token_ids
            assert got.prompt_logprobs is not None and alone.prompt_logprobs is not None
            assert [lp.logprob for lp in got.prompt_logprobs if lp] == pytest.approx(
                [lp.logprob for lp in alone.prompt_logprobs if lp], abs=1e-4
            )


def test_chunked_prefill_gives_what_one_step_gives(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # A budget of 7 prompt tokens per step: every prompt is prefilled over several steps, in
    # chunks that attend to the cache, while other requests decode; tokens and logprobs must
    # be those of the one-step prefill (the module engine's budget is 4096).
    params = SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=2
    )
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (_prompt(40 + i, 9 + 6 * i), name, params)
        for i, name in enumerate(["all-r16", None, "qv-r8", "all-r16", "mlp-r2"])
    ]
    requests += [
        (requests[0][0], "all-r16", replace(params, temperature=0.8, seed=s)) for s in (1, 2)
    ]
    config = EngineConfig(max_batch_size=8, max_model_len=256, max_num_batched_tokens=7)
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as chunked:
        got = chunked.generate_many(requests, timeout=120)
        steps = chunked.scheduler.stats.steps
        # The last two share their prompt's chunks (a fork): each prompt once, the first twice.
        prefilled = chunked.scheduler.stats.prefill_tokens
        assert prefilled == sum(len(p) for p, _, _ in requests[:6])
        assert chunked.stats()["running"] == 0 and chunked.scheduler.prefix.available == 8
    assert steps > sum(len(p) for p, _, _ in requests[:5]) // 7
    for request, mine in zip(requests, got, strict=True):
        whole = engine.generate(*request, timeout=60)
        assert mine.token_ids == whole.token_ids
        assert mine.logprobs is not None and whole.logprobs is not None
        assert [lp.logprob for lp in mine.logprobs] == pytest.approx(
            [lp.logprob for lp in whole.logprobs], abs=1e-4
        )
        assert mine.prompt_logprobs is not None and whole.prompt_logprobs is not None
        assert len(mine.prompt_logprobs) == len(request[0])
        assert [lp.logprob for lp in mine.prompt_logprobs if lp] == pytest.approx(
            [lp.logprob for lp in whole.prompt_logprobs if lp], abs=1e-4
        )


def test_cancelling_a_request_mid_prompt_frees_its_slots(tiny_base: Path) -> None:
    config = EngineConfig(max_batch_size=2, max_model_len=256, max_num_batched_tokens=4)
    with Engine(tiny_base, config) as eng:
        long = eng.start_many([(_prompt(50, 200), None, GREEDY)])[0]
        deadline = time.monotonic() + 30
        while not eng.scheduler.prefilling:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        long.cancel()
        _settled(eng)
        assert eng.scheduler.prefix.available == 2 and not eng.scheduler.prefilling
        assert eng.generate([5, 6], None, GREEDY, timeout=30).finish_reason == "length"


def test_closing_answers_a_request_mid_prompt(tiny_base: Path) -> None:
    config = EngineConfig(max_batch_size=2, max_model_len=512, max_num_batched_tokens=1)
    eng = Engine(tiny_base, config)
    try:
        pending = eng.start_many([(_prompt(60, 400), None, GREEDY)])[0]
        deadline = time.monotonic() + 30
        while not eng.scheduler.prefilling:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # Mid-prompt, it counts once as running (not also as the step's new sequence).
        assert eng.stats()["running"] == 1
    finally:
        eng.close()
    with pytest.raises(EngineClosed):
        pending.result(5)


def _collected(ref: weakref.ref[Engine], timeout: float = 10.0) -> bool:
    """Whether the engine `ref` names is garbage-collected within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gc.collect()
        if ref() is None:
            return True
        time.sleep(0.05)
    return False


def test_an_engine_dropped_without_close_is_collected_and_its_threads_end(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # A notebook cell run again without close(): the step thread held the engine (its bound
    # method was the thread's target), and the residency held it through its prepare callback,
    # so the model, KV cache and slot pools stayed in memory and the thread stepped for ever.
    config = EngineConfig(max_batch_size=2, adapter_slots=2, max_model_len=64)
    before = set(threading.enumerate())  # other tests' engines may be running
    eng = Engine(tiny_base, config, source=PeftDirSource(zoo))
    assert len(eng.generate([5, 6], "mlp-r2", GREEDY, timeout=30).token_ids) == 12
    assert eng.prefetch("o-r6").result(30) is not None
    ref = weakref.ref(eng)
    ours = [t for t in threading.enumerate() if t not in before]
    assert {"mintvcs-engine", "mintvcs-adapter-load_0"} <= {t.name for t in ours}
    del eng
    assert _collected(ref)
    for thread in ours:
        thread.join(10)
        assert not thread.is_alive(), thread.name

    # One never started has no step thread: its loader-side threads end with it all the same.
    before = set(threading.enumerate())
    idle = Engine(tiny_base, config, source=PeftDirSource(zoo), start=False)
    ref = weakref.ref(idle)
    helpers = [t for t in threading.enumerate() if t not in before]
    del idle
    assert _collected(ref)
    for thread in helpers:
        thread.join(10)
        assert not thread.is_alive(), thread.name


def test_an_unreferenced_engine_lives_while_its_requests_are_awaited(tiny_base: Path) -> None:
    # Only the stream (or future) of a running request refers to the engine: it must not be
    # collected under the caller mid-request, and is once that request is done with.
    config = EngineConfig(max_batch_size=2, max_model_len=128)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    before = set(threading.enumerate())

    async def stream_from_a_dropped_engine() -> tuple[weakref.ref[Engine], list[TokenEvent]]:
        eng = Engine(tiny_base, config)
        ref, stream = weakref.ref(eng), eng.submit([5, 6, 7], None, params)
        del eng
        events = []
        async for event in stream:
            gc.collect()
            assert ref() is not None
            events.append(event)
        return ref, events

    ref, events = asyncio.run(stream_from_a_dropped_engine())
    assert len(events) == 16 and events[-1].finish_reason == "length"
    assert _collected(ref)

    async def drop_engine_and_stream_mid_request() -> weakref.ref[Engine]:
        eng = Engine(tiny_base, config)
        long = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        ref, stream = weakref.ref(eng), eng.submit([5, 6, 7], None, long)
        del eng
        await anext(stream)
        return ref  # the stream goes unfinished: its request is cancelled, then the engine

    assert _collected(asyncio.run(drop_engine_and_stream_mid_request()))

    eng = Engine(tiny_base, config)
    ref, future = weakref.ref(eng), eng.start_many([([5, 6, 7], None, params)])[0]
    del eng
    gc.collect()
    assert future.result(30).token_ids == [e.token_id for e in events]
    del future
    assert _collected(ref)
    for thread in set(threading.enumerate()) - before:  # the engines' threads end too
        thread.join(10)
        assert not thread.is_alive(), thread.name


@pytest.mark.parametrize("where", ["tokenizer_config", "special_tokens_map"])
def test_the_tokenizers_eos_token_ends_a_sequence(tmp_path: Path, where: str) -> None:
    """A ChatML fine-tune names <|im_end|> as the tokenizer's eos_token while config.json keeps
    the base's id: vLLM stops on it (its request EOS is the tokenizer's), and so do we."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import AutoTokenizer

    from tests.fixtures import build_base

    base = build_base(tmp_path / "base", vocab_size=400)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    tokenizer.save(str(base / "tokenizer.json"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    if where == "tokenizer_config":
        config["eos_token"] = "<|im_end|>"
    else:  # an older save: the special tokens in special_tokens_map.json only
        config.pop("eos_token", None)
        config.pop("added_tokens_decoder", None)
        (base / "special_tokens_map.json").write_text(
            json.dumps({"eos_token": {"content": "<|im_end|>", "special": True}})
        )
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    im_end = AutoTokenizer.from_pretrained(str(base)).eos_token_id
    assert im_end == tokenizer.token_to_id("<|im_end|>") != 2
    assert json.loads((base / "config.json").read_text())["eos_token_id"] == 2
    forced = SamplingParams(max_tokens=6, temperature=0, logit_bias=((im_end, 100.0),))
    with Engine(base, EngineConfig(device="cpu", max_model_len=64)) as eng:
        done = eng.generate([5, 6, 7], None, forced, timeout=60)
        assert done.token_ids == [im_end] and done.finish_reason == "stop", done
        # config.json's id still ends one too.
        done = eng.generate([5, 6], None, replace(forced, logit_bias=((2, 100.0),)), timeout=60)
        assert done.token_ids == [2] and done.finish_reason == "stop", done


@pytest.mark.parametrize(
    ("key", "stored", "cuda"),
    [
        ("torch_dtype", "float16", torch.float16),
        ("dtype", "float16", torch.float16),  # transformers 5's name
        ("torch_dtype", "bfloat16", torch.bfloat16),
        ("torch_dtype", "float32", torch.bfloat16),
        (None, None, torch.bfloat16),
    ],
)
def test_default_dtype_keeps_an_fp16_base_fp16_on_cuda(
    tiny_base: Path, tmp_path: Path, key: str | None, stored: str | None, cuda: torch.dtype
) -> None:
    """As vLLM's auto: bf16 would round an fp16 base's weights to 7 mantissa bits; CPU stays fp32
    and a configured dtype wins. (Only the choice runs here: no CUDA device is needed for it.)"""
    from mintvcs.serve.loader import read_config

    config: dict[str, Any] = json.loads((tiny_base / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if key is not None:
        config[key] = stored
    (tmp_path / "config.json").write_text(json.dumps(config))
    read = read_config(tmp_path).stored_dtype
    assert read == stored
    auto = EngineConfig()
    assert auto.torch_dtype(torch.device("cuda"), read) == cuda
    assert auto.torch_dtype(torch.device("cpu"), read) == torch.float32
    chosen = EngineConfig(dtype="bfloat16")
    assert chosen.torch_dtype(torch.device("cuda"), read) == torch.bfloat16


@pytest.mark.parametrize(
    ("stored", "cuda"),
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
)
def test_without_torch_dtype_the_weights_stored_dtype_chooses(
    tmp_path: Path, stored: torch.dtype, cuda: torch.dtype
) -> None:
    """A config.json without torch_dtype: its fp16 weights used to be served in bf16 on CUDA."""
    from safetensors.torch import load_file, save_file

    from mintvcs.serve.loader import read_config

    base = _edited_base(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config.pop("torch_dtype")
    (base / "config.json").write_text(json.dumps(config))
    weights = load_file(str(base / "model.safetensors"))
    save_file({k: v.to(stored) for k, v in weights.items()}, str(base / "model.safetensors"))
    read = read_config(base).stored_dtype
    assert read == str(stored).removeprefix("torch.")
    assert EngineConfig().torch_dtype(torch.device("cuda"), read) == cuda
    assert EngineConfig().torch_dtype(torch.device("cpu"), read) == torch.float32


def test_a_finished_request_finds_its_tokens_counted(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step's counters are updated before its events go out: a client that reads /metrics
    right after its answer found the prompt it sent not yet counted (a test flaked on it)."""
    from mintvcs.serve import scheduler as scheduler_module

    seen: list[tuple[int, int]] = []
    deliver = scheduler_module._deliver

    def deliver_and_look(seq: Any, item: Any) -> None:
        if isinstance(item, TokenEvent) and item.finish_reason is not None:
            stats = engine.scheduler.stats
            seen.append((stats.prefill_tokens, stats.generated_tokens))
        deliver(seq, item)

    monkeypatch.setattr(scheduler_module, "_deliver", deliver_and_look)
    with Engine(tiny_base, EngineConfig(max_model_len=64)) as engine:
        done = engine.generate([1, 5, 9, 13, 17], None, SamplingParams(max_tokens=1))
    assert done.prompt_tokens == 5
    assert seen == [(5, 1)]


def test_one_cancelled_warm_leaves_others_waiting_on_the_same_load(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    # Every caller of one load got the same future: a client gone from `await warm()` (the
    # server cancels its handler) cancelled it for the others, who got CancelledError.
    source = _GatedSource(zoo, "qv-r8")
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=512)
    endless = SamplingParams(max_tokens=None, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, source=source) as eng:
        busy = eng.start_many([([5, 6], "mlp-r2", endless), ([5, 7], "o-r6", endless)])
        deadline = time.monotonic() + 30
        while eng.stats()["running"] < 2:  # every slot busy: the warm goes to the host cache
            assert time.monotonic() < deadline
            time.sleep(0.01)

        async def two_waiters() -> object:
            first = asyncio.create_task(eng.warm("qv-r8"))
            second = asyncio.create_task(eng.warm("qv-r8"))
            await asyncio.sleep(0.3)  # the load is in progress, held at the gate
            first.cancel()
            await asyncio.sleep(0.05)
            source.gate.set()
            return await asyncio.wait_for(second, 30)

        assert asyncio.run(two_waiters()) is None  # None: it reached the host cache
        for f in busy:
            f.cancel()


def test_a_prompt_of_rows_or_floats_is_a_type_error_naming_the_item(engine: Engine) -> None:
    # A tokenizer's return_tensors="pt" is 2-D: the error search found nothing and a bare
    # StopIteration escaped (a RuntimeError inside a coroutine).
    for prompt, item in (
        (torch.tensor([[5, 6]]), "tensor([5, 6])"),
        (torch.tensor([5.0, 6.0]), "tensor(5.)"),
        (np.array([[5, 6]]), "array([5, 6])"),
        ((x for x in (5, 1.5)), "1.5"),
    ):
        with pytest.raises(TypeError, match=f"it holds {re.escape(item)}"):
            engine.generate(prompt, None, GREEDY)  # type: ignore[arg-type]


class _TimingOutSource(PeftDirSource):
    def load(self, revision: str, *, max_bytes: int | None = None) -> Any:
        if revision == "o-r6":
            raise TimeoutError("the adapter store did not answer")
        return super().load(revision, max_bytes=max_bytes)


def test_a_requests_own_timeout_error_is_not_taken_for_the_deadline(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    config = EngineConfig(max_batch_size=4, adapter_slots=2, max_model_len=512)
    with (
        Engine(tiny_base, config, source=_TimingOutSource(zoo)) as eng,
        pytest.raises(Exception) as raised,
    ):
        eng.generate_many([([5, 6], "o-r6", GREEDY), ([5, 7], None, GREEDY)])
    assert "had not finished" not in str(raised.value), raised.value


def test_a_seeded_request_draws_the_same_tokens_alone_and_at_any_batch_position(
    engine: Engine,
) -> None:
    # fp32, the CPU default: the logits of a row differ with the batch only by rounding (about
    # 1e-7), so a seed's tokens are the same alone and batched; docs/http.md's seed row rests
    # on this. In bf16/fp16 that rounding is larger and tokens can part ways (not promised).
    assert engine.model.dtype == torch.float32
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=42, ignore_eos=True)
    request = (_prompt(41, 7), "all-r16", seeded)
    others: list[tuple[list[int], str | None, SamplingParams]] = [
        (_prompt(42, 13), None, GREEDY),
        (_prompt(43, 4), "qv-r8", replace(seeded, seed=7, top_p=0.9)),
        (_prompt(44, 30), "all-r16", GREEDY),
        (_prompt(45, 9), None, replace(seeded, seed=8, temperature=0.7)),
    ]
    alone = engine.generate(*request, timeout=60).token_ids
    for position in (0, 2, len(others)):
        batch = [*others[:position], request, *others[position:]]
        together = engine.generate_many(batch, timeout=120)
        assert together[position].token_ids == alone, position
    other_seed = engine.generate(request[0], request[1], replace(seeded, seed=43), timeout=60)
    assert other_seed.token_ids != alone


def _edited_base(directory: Path, arch: str = "llama", **changes: Any) -> Path:
    """A tiny base of `arch` with `changes` made to its config.json."""
    from tests.fixtures import build_base

    base = build_base(directory, arch)
    path = base / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return base


def test_a_kv_cache_larger_than_the_device_is_refused_before_rope_tables_are_built(
    tmp_path: Path,
) -> None:
    # It used to fail on the RoPE tables of max_model_len rows, in the allocator's words (or
    # take tens of GB), before the KV-cache check that names the options.
    base = _edited_base(tmp_path / "base", max_position_embeddings=2**40)
    with pytest.raises(
        EngineError,
        match=r"the KV cache for 1 sequences of 549755813888 tokens needs \d+ bytes "
        r"\([\d.]+ GiB\) of cpu memory, more than the [\d.]+ GiB it has; lower max_batch_size "
        r"\(--max-batch-size\) or max_model_len \(--max-model-len\)",
    ):
        Engine(base, EngineConfig(max_model_len=2**39, max_batch_size=1))


def test_a_sliding_window_refusal_comes_before_the_weights_are_read(tmp_path: Path) -> None:
    # A large base took minutes to read before it; damaged weights show they are not read.
    base = _edited_base(tmp_path / "base", "mistral", sliding_window=64)
    (base / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(
        UnsupportedModelError,
        match=r"sliding-window attention is not implemented; set max_model_len "
        r"\(--max-model-len\) <= 64",
    ):
        Engine(base, EngineConfig(max_model_len=128))


def test_a_tokenizer_that_does_not_parse_is_refused_before_the_weights_are_read(
    tmp_path: Path,
) -> None:
    from tests.fixtures import build_base

    base = build_base(tmp_path / "base")
    (base / "model.safetensors").write_bytes(b"\x01\x02")
    (base / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match=r"tokenizer\.json is not a tokenizer"):
        Engine(base, EngineConfig(max_model_len=64))


def test_a_tokenizer_with_ids_past_the_vocabulary_is_named_at_start_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It used to start without a word; requests were then refused one by one.
    from tests.fixtures import build_base

    base = build_base(tmp_path / "base", vocab_size=300)  # its tokenizer has 384 ids
    with Engine(base, EngineConfig(max_model_len=64, check_base_fingerprint=False)):
        pass
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        f"{base}/tokenizer.json has 84 token id(s) outside the model's vocabulary [0, 300) "
        "(config.json's vocab_size), up to 383: prompts that encode to them, and structured "
        "outputs, will be refused (400); is it the tokenizer of this model?"
    ]
    caplog.clear()
    with Engine(
        build_base(tmp_path / "wider", vocab_size=400),
        EngineConfig(max_model_len=64, check_base_fingerprint=False),
    ):
        pass  # a vocabulary padded past the tokenizer's ids is common and fine
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


class _Watched(Sequence):
    """A queued request that records every look at it (an attribute read) by the step."""

    looked_at: ClassVar[set[int]] = set()

    def __getattribute__(self, name: str) -> Any:
        _Watched.looked_at.add(id(self))
        return super().__getattribute__(name)


def _steps_until(eng: Engine, done: Any, limit: int = 500) -> None:
    for _ in range(limit):
        if done():
            return
        if eng._step() is not None:
            time.sleep(0.01)  # nothing runnable: an adapter is loading on the loader thread
    raise AssertionError(f"not reached after {limit} steps: {eng.stats()}")


@pytest.mark.parametrize("backlog", ["kv-slots-full", "adapter-stalled"])
def test_a_step_looks_at_the_head_of_the_queue_not_at_the_whole_backlog(
    tiny_base: Path, zoo: dict[str, Path], backlog: str
) -> None:
    # 300 requests wait behind the running ones, either for a KV slot (every one is taken) or for
    # an adapter slot (the only one is busy with another revision): a step's scheduling work must
    # not grow with them (cancels, finished requests and fork parents are found without a scan).
    config = EngineConfig(max_batch_size=2, adapter_slots=1, max_model_len=256)
    if backlog == "adapter-stalled":
        config = replace(config, max_batch_size=4)
    long = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, source=PeftDirSource(zoo), start=False) as eng:
        running = eng.start_many([(_prompt(i, 5), "qv-r8", long) for i in range(2)])
        _steps_until(eng, lambda: eng.stats()["running"] == 2)
        revision = None if backlog == "kv-slots-full" else "mlp-r2"
        queued = eng.start_many([(_prompt(10 + i, 5), revision, one) for i in range(300)])
        eng._step()  # moves them from the inbox into the scheduler's queue
        waiting = list(eng.scheduler.waiting)
        assert len(waiting) == 300
        for seq in waiting:
            seq.__class__ = _Watched
        _Watched.looked_at.clear()
        steps = eng.stats()["steps"]
        for _ in range(5):
            eng._step()
        assert eng.stats()["steps"] == steps + 5 and eng.stats()["running"] == 2
        assert len(_Watched.looked_at) <= 1, f"a step looked at {len(_Watched.looked_at)} of 300"
        # The backlog still runs once the slots free up.
        _steps_until(eng, lambda: all(f.done() for f in [*running, *queued]), limit=2000)
        assert [f.result().finish_reason for f in queued] == ["length"] * 300
        if backlog == "adapter-stalled":  # every request waited for its adapter, the first two too
            assert eng.stats()["slot_misses"] == 302


def test_the_running_gauge_never_reads_fewer_than_the_requests_decoding(tiny_base: Path) -> None:
    # stats() is read from other threads (/metrics) while the step thread hands out a step's
    # tokens: a read then must still count every request that holds a KV slot. Each request's
    # sink runs on the step thread at exactly that point, so it reads the gauge there, every time.
    config = EngineConfig(max_batch_size=4, max_model_len=256)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, start=False) as eng:
        futures = eng.start_many([(_prompt(i, 5), None, long) for i in range(4)])
        seen: dict[int, int] = {}

        def reading(sink: Any) -> Any:
            def read_then_deliver(item: Any) -> None:
                if isinstance(item, TokenEvent) and item.index > 1 and item.finish_reason is None:
                    running = eng.stats()["running"]
                    seen[running] = seen.get(running, 0) + 1
                sink(item)

            return read_then_deliver

        for seq in eng._seqs.values():
            seq.sink = reading(seq.sink)
        _steps_until(eng, lambda: all(f.done() for f in futures))
        assert seen.keys() == {4}, f"running read as: {seen}"
        assert sum(seen.values()) == 4 * 38
        assert [f.result().finish_reason for f in futures] == ["length"] * 4


def test_cancelled_waiting_requests_are_not_kept_alive_by_the_queue(tiny_base: Path) -> None:
    # The only KV slot is busy, so no step walks the queue: the cancelled requests must still go.
    config = EngineConfig(max_batch_size=1, max_model_len=256)
    long = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, config, start=False) as eng:
        first = eng.start_many([(_prompt(3, 5), None, long)])[0]
        _steps_until(eng, lambda: eng.stats()["running"] == 1)
        queued = eng.start_many([(_prompt(10 + i, 5), None, long) for i in range(5)])
        eng._step()
        gone = [weakref.ref(seq) for seq in eng.scheduler.waiting]
        assert len(gone) == 5
        for future in queued:
            future.cancel()
        _steps_until(eng, lambda: eng.stats()["requests_cancelled"] == 5)
        gc.collect()
        assert not first.done() and eng.stats()["queue_depth"] == 0
        assert [ref() for ref in gone] == [None] * 5


def test_a_request_submitted_right_after_the_step_looked_at_its_inbox_wakes_it(
    tiny_base: Path,
) -> None:
    # A submit (put, then wake) that lands just after the step thread found its inbox empty (a
    # preemption there) must leave the wakeup set: else the request waits the idle timeout (1 s).
    with Engine(tiny_base, EngineConfig(max_batch_size=2, max_model_len=64), start=False) as eng:
        submitted: list[Any] = []
        inbox = eng._inbox

        class SubmitAfterTheLook:
            def __getattr__(self, name: str) -> Any:
                return getattr(inbox, name)

            def empty(self) -> bool:
                found = inbox.empty()
                if found and not submitted:
                    submitted.extend(eng.start_many([([5, 6, 7], None, GREEDY)]))
                return found

        eng._inbox = SubmitAfterTheLook()  # type: ignore[assignment]
        wait = eng._step()
        assert submitted and wait == 1.0  # it saw nothing to do
        assert eng._wake.is_set(), "the request's wakeup was lost: it would wait for the timeout"
        _steps_until(eng, lambda: submitted[0].done())
        assert submitted[0].result().finish_reason == "length"
