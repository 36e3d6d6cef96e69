"""Token and prompt log-probabilities against PEFT's own logits (the peer as oracle)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve import Engine, SamplingParams
from mintvcs.serve import scheduler as scheduler_module
from mintvcs.serve.sampling import InvalidSamplingParams, TokenLogprobs


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _peft_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """log_softmax of PEFT's logits at every position of `ids` [len, vocab]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check(found: TokenLogprobs, expected: torch.Tensor, top: int) -> None:
    value = float(expected[found.token_id])
    assert found.logprob == pytest.approx(value, abs=1e-4)
    # Its place in the whole vocabulary, 1-based (a near-tie may fall either way).
    assert (
        int((expected > value + 1e-4).sum()) < found.rank <= int((expected >= value - 1e-4).sum())
    )
    assert len(found.top) == top
    values, ids = torch.topk(expected, top)
    assert [t for t, _ in found.top] == ids.tolist()
    assert [v for _, v in found.top] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("name", ["all-r16", None])
def test_token_and_prompt_logprobs_equal_peft(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path], name: str | None
) -> None:
    prompt = _prompt(3, 13)
    params = SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=4, prompt_logprobs=3
    )
    done = engine.generate(prompt, name, params, timeout=60)
    expected = _peft_logprobs(tiny_base, zoo[name] if name else None, prompt + done.token_ids)
    assert done.logprobs is not None and len(done.logprobs) == len(done.token_ids)
    for i, (token, found) in enumerate(zip(done.token_ids, done.logprobs, strict=True)):
        assert found.token_id == token
        _check(found, expected[len(prompt) - 1 + i], 4)
        # Greedy: the token taken is the likeliest one.
        assert found.top[0][0] == token
    assert done.prompt_logprobs is not None and len(done.prompt_logprobs) == len(prompt)
    assert done.prompt_logprobs[0] is None
    for j, found_prompt in enumerate(done.prompt_logprobs[1:], start=1):
        assert found_prompt is not None and found_prompt.token_id == prompt[j]
        _check(found_prompt, expected[j - 1], 3)


def test_logprobs_are_of_the_raw_distribution_whatever_the_sampling(
    engine: Engine, tiny_base: Path
) -> None:
    prompt = _prompt(4, 9)
    params = SamplingParams(max_tokens=5, temperature=0.7, top_k=5, seed=7, logprobs=0)
    done = engine.generate(prompt, None, params, timeout=60)
    expected = _peft_logprobs(tiny_base, None, prompt + done.token_ids)
    assert done.logprobs is not None
    for i, found in enumerate(done.logprobs):
        assert found.top == ()
        assert found.logprob == pytest.approx(
            float(expected[len(prompt) - 1 + i][found.token_id]), abs=1e-4
        )


ONE_OF_THREE = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)


def test_each_request_in_a_batch_gets_the_alternatives_it_asked_for(engine: Engine) -> None:
    # The batch computes the most alternatives any request asked for; each gets its own
    # count (OpenAI's top_logprobs: that many), 0 and 1 beside 5 as when alone.
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (_prompt(20 + top, 7), None, replace(ONE_OF_THREE, logprobs=top)) for top in (5, 0, 1)
    ]
    together = engine.generate_many(requests, timeout=60)
    for (_, _, params), done in zip(requests, together, strict=True):
        assert done.logprobs is not None and len(done.logprobs) == 3
        assert all(len(found.top) == params.logprobs for found in done.logprobs), params


def test_scored_prefills_in_a_mixed_batch_equal_each_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows through the LM head a few at a time: several chunks per prompt, a partial last one.
    monkeypatch.setattr(scheduler_module, "PROMPT_LOGPROBS_ROWS", 5)
    scored = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    requests: list[tuple[list[int], str | None, SamplingParams]] = [
        (_prompt(10 + i, 6 + 5 * i), name, scored if i % 2 else plain)
        for i, name in enumerate(["qv-r8", None, "all-r16", "mlp-r2", None, "o-r6"])
    ]
    together = engine.generate_many(requests, timeout=120)
    for request, mixed in zip(requests, together, strict=True):
        alone = engine.generate(*request, timeout=60)
        assert mixed.token_ids == alone.token_ids
        if request[2] is plain:
            assert mixed.prompt_logprobs is None and mixed.logprobs is None
            continue
        assert mixed.prompt_logprobs is not None and alone.prompt_logprobs is not None
        assert len(mixed.prompt_logprobs) == len(request[0])
        for a, b in zip(mixed.prompt_logprobs[1:], alone.prompt_logprobs[1:], strict=True):
            assert a is not None and b is not None
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_logprobs_out_of_range_are_refused() -> None:
    with pytest.raises(InvalidSamplingParams, match="logprobs must be in"):
        SamplingParams(logprobs=21)
    with pytest.raises(InvalidSamplingParams, match="prompt_logprobs must be in"):
        SamplingParams(prompt_logprobs=-1)
