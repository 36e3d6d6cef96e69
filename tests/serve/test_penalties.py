"""Penalties, logit_bias, min_tokens and min_p: against HF transformers' own processors where it has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve import Engine, InvalidRequest, SamplingParams
from mintvcs.serve.sampling import InvalidSamplingParams, PenaltyHistory, adjust_logits, sample


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_greedy(base: Path, adapter: Path | None, prompt: list[int], **kw: Any) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=torch.tensor([prompt]), do_sample=False, pad_token_id=0, **kw
        )
    return list(out[0, len(prompt) :].tolist())


def test_repetition_penalty_equals_hf(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path]
) -> None:
    prompt = _prompt(21, 12)
    for penalty in (1.5, 0.7):
        params = SamplingParams(
            max_tokens=16, temperature=0.0, ignore_eos=True, repetition_penalty=penalty
        )
        ours = engine.generate(prompt, "all-r16", params, timeout=60).token_ids
        hf = _hf_greedy(
            tiny_base,
            zoo["all-r16"],
            prompt,
            max_new_tokens=16,
            eos_token_id=None,
            repetition_penalty=penalty,
        )
        assert ours == hf
        plain = engine.generate(
            prompt,
            "all-r16",
            SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
            timeout=60,
        )
        assert ours != plain.token_ids  # the penalty changed what greedy picks


def test_min_tokens_and_logit_bias_equal_hf(engine: Engine, tiny_base: Path) -> None:
    prompt = _prompt(22, 10)
    plain = engine.generate(
        prompt, None, SamplingParams(max_tokens=12, temperature=0.0), timeout=60
    )
    # Make the first token greedy picks a stop token: without min_tokens the output is one token.
    stop = plain.token_ids[0]
    stopped = engine.generate(
        prompt,
        None,
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,)),
        timeout=60,
    )
    assert stopped.token_ids == [stop] and stopped.finish_reason == "stop"
    held = engine.generate(
        prompt,
        None,
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=(stop,), min_tokens=5),
        timeout=60,
    )
    hf = _hf_greedy(tiny_base, None, prompt, max_new_tokens=12, eos_token_id=stop, min_new_tokens=5)
    assert held.token_ids == hf and len(held.token_ids) > 5
    assert stop not in held.token_ids[:5]

    favourite = 377
    biased = engine.generate(
        prompt,
        None,
        SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias=((favourite, 3.0),)
        ),
        timeout=60,
    )
    hf = _hf_greedy(
        tiny_base,
        None,
        prompt,
        max_new_tokens=8,
        eos_token_id=None,
        sequence_bias={(favourite,): 3.0},
    )
    assert biased.token_ids == hf and favourite in biased.token_ids


def test_presence_and_frequency_penalties_follow_openai_formula() -> None:
    logits = torch.linspace(-2.0, 3.0, 10)
    output = [9, 9, 4]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = adjust_logits(logits, params, [1, 2], output, frozenset())
    expected = logits.clone()
    expected[9] -= 2 * 0.25 + 0.5
    expected[4] -= 1 * 0.25 + 0.5
    assert torch.equal(got, expected)
    assert torch.equal(logits, torch.linspace(-2.0, 3.0, 10))  # the input row is untouched


def test_penalties_change_the_output_over_the_engine(engine: Engine) -> None:
    prompt = _prompt(23, 8)
    base = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = engine.generate(prompt, None, base, timeout=60).token_ids
    penalised = engine.generate(
        prompt,
        None,
        SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, frequency_penalty=2.0),
        timeout=60,
    ).token_ids
    # A strong frequency penalty makes greedy repeat itself less.
    assert len(set(penalised)) >= len(set(plain)) and penalised != plain


def test_a_sampled_request_beside_a_penalised_greedy_one_draws_from_its_own_logits(
    engine: Engine,
) -> None:
    # One row drawn (the seeded one) and one row changed (the penalised greedy one): each
    # request in the batch gives what it gives alone.
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (_prompt(24, 8), None, SamplingParams(max_tokens=12, temperature=1.0, seed=3)),
        (
            _prompt(25, 8),
            None,
            SamplingParams(max_tokens=12, temperature=0.0, frequency_penalty=2.0),
        ),
    ]
    together = engine.generate_many(requests, timeout=60)
    for request, got in zip(requests, together, strict=True):
        assert got.token_ids == engine.generate(*request, timeout=60).token_ids


def test_min_p_keeps_only_tokens_near_the_likeliest() -> None:
    logits = torch.tensor([4.0, 3.9, 1.0, 0.5, -3.0])
    probs = torch.softmax(logits, dim=0)
    params = SamplingParams(temperature=1.0, min_p=0.5)
    drawn = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    allowed = {i for i in range(5) if probs[i] >= 0.5 * probs.max()}
    assert drawn == allowed == {0, 1}


def test_min_p_keeps_a_token_exactly_at_its_threshold_as_hf_does() -> None:
    from transformers.generation.logits_process import MinPLogitsWarper

    # min_p=1.0 keeps exactly the tokens tied with the likeliest: each is at the threshold
    # (vLLM and HF cut only what is below it). A strict cut would keep nothing and draw a token
    # min_p removed.
    logits = torch.tensor([0.0, 3.0, 3.0, 1.0, -1.0])
    warped = MinPLogitsWarper(min_p=1.0)(torch.zeros((1, 1), dtype=torch.long), logits[None])
    allowed = {i for i in range(5) if torch.isfinite(warped[0, i])}
    params = SamplingParams(temperature=1.0, min_p=1.0)
    drawn = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(200)}
    assert drawn == allowed == {1, 2}


def test_out_of_range_values_are_refused(engine: Engine) -> None:
    for kw in (
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"min_p": 1.5},
        {"min_tokens": 20, "max_tokens": 10},
        {"logit_bias": ((1, 101.0),)},
    ):
        with pytest.raises(InvalidSamplingParams):
            SamplingParams(**kw)  # type: ignore[arg-type]
    vocab = engine.model.config.vocab_size
    with pytest.raises(InvalidRequest, match="logit_bias token id"):
        engine.generate([5, 6], None, SamplingParams(logit_bias=((vocab, 1.0),)))
    with pytest.raises(InvalidRequest, match="stop token id"):
        engine.generate([5, 6], None, SamplingParams(stop_token_ids=(vocab + 3,)))


class _CountedReads(list[int]):
    """A list that counts how often it is read through."""

    reads = 0

    def __iter__(self) -> Any:
        self.reads += 1
        return super().__iter__()


def test_a_request_s_penalty_history_reads_its_prompt_once_and_counts_as_it_goes() -> None:
    vocab = 50
    gen = torch.Generator().manual_seed(5)
    prompt = _CountedReads(torch.randint(0, vocab, (40,), generator=gen).tolist())
    params = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.2)
    history = PenaltyHistory(prompt, vocab, torch.device("cpu"))
    output: list[int] = []
    for step in range(30):
        logits = torch.randn(vocab, generator=gen)
        got = adjust_logits(logits, params, prompt, output, frozenset(), history)
        # The same row from scratch (a fresh history), by the definition of the penalties.
        seen = sorted({*prompt, *output})
        expected = logits.clone()
        expected[seen] = torch.where(expected[seen] > 0, expected[seen] / 1.3, expected[seen] * 1.3)
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()
        expected -= 0.2 * counts + 0.5 * (counts > 0)
        assert torch.allclose(got, expected), step
        # Sometimes two tokens come at once (the counts catch up with what they have not seen).
        output.extend(torch.randint(0, vocab, (1 + step % 3 // 2,), generator=gen).tolist())
    # The comparison above read the prompt once per step; the history read it once in all.
    assert prompt.reads == 30 + 1
