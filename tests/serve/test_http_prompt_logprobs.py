"""vLLM's prompt_logprobs on /v1/completions and /v1/chat/completions, against transformers' and PEFT's own logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve.app import BackgroundServer
from tests.serve.http_kit import request, sse_events


def _oracle_logprobs(base: Path, adapter: Path | None, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' fp32 logits (PEFT's, with an adapter) at every position of `ids` [len, vocab]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _decode_one(base: Path, token_id: int) -> str:
    """The token decoded alone, as vLLM names a logprob's token (transformers' tokenizer, special tokens kept)."""
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(str(base)).decode([token_id]))


def _post(server: BackgroundServer, route: str, body: dict[str, Any]) -> tuple[int, Any]:
    status, _, answer = request(server.url + route, body)
    return status, answer


def _check_against(
    found: list[Any], ids: list[int], expected: torch.Tensor, top: int, base: Path
) -> None:
    """`found` is vLLM's prompt_logprobs of `ids` with `top` alternatives, as `expected` [len, vocab] gives them."""
    assert len(found) == len(ids)
    assert found[0] is None  # nothing predicts the first token
    for j in range(1, len(ids)):
        row = expected[j - 1]
        position = found[j]
        assert all(isinstance(key, str) for key in position)
        token = position[str(ids[j])]
        value = float(row[ids[j]])
        assert token["logprob"] == pytest.approx(value, abs=1e-4)
        # 1-based, against the whole vocabulary (a near-tie may fall either way).
        assert int((row > value + 1e-4).sum()) < token["rank"] <= int((row >= value - 1e-4).sum())
        assert token["decoded_token"] == _decode_one(base, ids[j])
        alternatives = {k: v for k, v in position.items() if k != str(ids[j])}
        likeliest = torch.topk(row, top)
        assert len(position) == top + (str(ids[j]) not in {str(int(t)) for t in likeliest.indices})
        ranked = sorted(position.values(), key=lambda e: e["rank"])
        assert [e["rank"] for e in ranked[:top]] == list(range(1, top + 1))
        assert [e["logprob"] for e in ranked[:top]] == pytest.approx(
            likeliest.values.tolist(), abs=1e-4
        )
        for key, entry in alternatives.items():
            assert entry["logprob"] == pytest.approx(float(row[int(key)]), abs=1e-4)
            assert entry["decoded_token"] == _decode_one(base, int(key))


@pytest.mark.parametrize("adapter", [None, "a"])
def test_completion_prompt_logprobs_equal_transformers_and_peft(
    server: BackgroundServer, tiny_base: Path, adapters: dict[str, Path], adapter: str | None
) -> None:
    model = "main" if adapter else server.config.base_name
    body = {
        "model": model,
        "prompt": "Hello world, the cat sat",
        "prompt_logprobs": 3,
        "max_tokens": 2,
        "temperature": 0,
        "return_token_ids": True,
    }
    status, answer = _post(server, "/v1/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    ids = choice["prompt_token_ids"]
    assert choice["logprobs"] is None  # the completion's own logprobs were not asked for
    expected = _oracle_logprobs(tiny_base, adapters[adapter] if adapter else None, ids)
    _check_against(choice["prompt_logprobs"], ids, expected, 3, tiny_base)


def test_prompt_logprobs_zero_gives_the_prompt_tokens_alone(server: BackgroundServer) -> None:
    status, answer = _post(
        server,
        "/v1/completions",
        {"model": "main", "prompt": "The answer is", "prompt_logprobs": 0, "max_tokens": 1},
    )
    assert status == 200, answer
    found = answer["choices"][0]["prompt_logprobs"]
    assert len(found) == answer["usage"]["prompt_tokens"] and found[0] is None
    assert all(len(position) == 1 for position in found[1:])
    # Without the field, a choice has none.
    body = {"model": "main", "prompt": "The answer is", "max_tokens": 1}
    assert "prompt_logprobs" not in _post(server, "/v1/completions", body)[1]["choices"][0]


def test_prompt_logprobs_with_n_batches_and_token_prompts(server: BackgroundServer) -> None:
    texts = ["Hello world, the cat", "A dog ran to the park"]
    single = []
    for text in texts:
        body = {"model": "main", "prompt": text, "prompt_logprobs": 2, "max_tokens": 1}
        body |= {"return_token_ids": True}
        status, answer = _post(server, "/v1/completions", body)
        assert status == 200, answer
        single.append(answer["choices"][0])
    # A batch of a token-id prompt and a text prompt, each sampled twice: every choice carries
    # its own prompt's logprobs, as that prompt alone got them.
    status, answer = _post(
        server,
        "/v1/completions",
        {
            "model": "main",
            "prompt": [single[0]["prompt_token_ids"], texts[1]],
            "n": 2,
            "temperature": 1.0,
            "seed": 7,
            "prompt_logprobs": 2,
            "max_tokens": 3,
        },
    )
    assert status == 200, answer
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    for i, choice in enumerate(answer["choices"]):
        alone = single[i // 2]["prompt_logprobs"]
        found = choice["prompt_logprobs"]
        assert len(found) == len(alone)
        for a, b in zip(found[1:], alone[1:], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                assert a[key]["logprob"] == pytest.approx(b[key]["logprob"], abs=1e-4)
                assert a[key]["rank"] == b[key]["rank"]
                assert a[key]["decoded_token"] == b[key]["decoded_token"]


def test_echo_logprobs_keep_their_own_count_beside_prompt_logprobs(
    server: BackgroundServer,
) -> None:
    body = {"model": "main", "prompt": "Hello world, the cat", "echo": True, "max_tokens": 1}
    body |= {"temperature": 0}
    status, plain = _post(server, "/v1/completions", {**body, "logprobs": 1})
    assert status == 200, plain
    status, both = _post(server, "/v1/completions", {**body, "logprobs": 1, "prompt_logprobs": 5})
    assert status == 200, both
    echoed, together = plain["choices"][0], both["choices"][0]
    # The echo's logprobs are those it gave alone: one alternative (and the token itself).
    assert together["logprobs"]["tokens"] == echoed["logprobs"]["tokens"]
    for mine, alone in zip(
        together["logprobs"]["top_logprobs"][1:],
        echoed["logprobs"]["top_logprobs"][1:],
        strict=True,
    ):
        assert mine == pytest.approx(alone, abs=1e-5)
    assert all(len(top) <= 2 for top in together["logprobs"]["top_logprobs"][1:])
    assert all(len(p) in (5, 6) for p in together["prompt_logprobs"][1:])
    # prompt_logprobs larger than the echo's, or smaller: each gets the count it asked for.
    status, fewer = _post(server, "/v1/completions", {**body, "logprobs": 4, "prompt_logprobs": 0})
    assert status == 200, fewer
    assert all(len(p) == 1 for p in fewer["choices"][0]["prompt_logprobs"][1:])
    assert max(len(t) for t in fewer["choices"][0]["logprobs"]["top_logprobs"][1:]) >= 4


def test_chat_prompt_logprobs_are_top_level_and_equal_peft(
    server: BackgroundServer, tiny_base: Path, adapters: dict[str, Path]
) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    status, answer = _post(
        server,
        "/v1/chat/completions",
        {
            "model": "main",
            "messages": messages,
            "prompt_logprobs": 2,
            "max_tokens": 2,
            "n": 2,
            "temperature": 1.0,
            "seed": 1,
        },
    )
    assert status == 200, answer
    status, tokenized = _post(server, "/tokenize", {"model": "main", "messages": messages})
    assert status == 200, tokenized
    ids = tokenized["tokens"]
    assert answer["usage"]["prompt_tokens"] == len(ids)
    # Once per response (vLLM's place for it), not per choice.
    assert all("prompt_logprobs" not in choice for choice in answer["choices"])
    expected = _oracle_logprobs(tiny_base, adapters["a"], ids)
    _check_against(answer["prompt_logprobs"], ids, expected, 2, tiny_base)
    body = {"model": "main", "messages": messages, "max_tokens": 1}
    assert "prompt_logprobs" not in _post(server, "/v1/chat/completions", body)[1]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"prompt_logprobs": -1}, "whole vocabulary"),
        ({"prompt_logprobs": -2}, "must be in [0, 20]"),
        ({"prompt_logprobs": 21}, "must be in [0, 20]"),
        ({"prompt_logprobs": "3"}, "must be int"),
        ({"prompt_logprobs": True}, "must be int"),
        ({"prompt_logprobs": 2.5}, "must be int"),
        ({"prompt_logprobs": 1, "stream": True}, "not available with stream"),
        ({"prompt_logprobs": 0, "stream": True}, "not available with stream"),
    ],
)
def test_prompt_logprobs_refusals(
    server: BackgroundServer, route: str, extra: dict[str, Any], says: str
) -> None:
    body: dict[str, Any] = {"model": "main", "max_tokens": 1, **extra}
    if route == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = "Hello world"
    status, answer = _post(server, route, body)
    assert status == 400, answer
    assert says in answer["error"]["message"], answer
    # The float 2.0 is 2 (pydantic's lax integers, as vLLM reads it).
    status, answer = _post(server, route, {**body, "stream": False, "prompt_logprobs": 2.0})
    assert status == 200, answer


def test_prompt_logprobs_answers_are_bounded(server: BackgroundServer) -> None:
    prompt = "Hello world, the cat sat on the mat. " * 4  # ~60 tokens
    body = {"model": "main", "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 20}
    status, answer = _post(server, "/v1/completions", {**body, "n": 1000})
    assert status == 400, answer
    message = answer["error"]["message"]
    assert "prompt_logprobs=20" in message and "log-probabilities" in message, message
    # Together with an echo's: both count.
    status, answer = _post(
        server, "/v1/completions", {**body, "n": 450, "echo": True, "logprobs": 20}
    )
    assert status == 400 and "echo with logprobs=20 and prompt_logprobs=20" in str(answer), answer


def test_generate_refuses_prompt_logprobs(server: BackgroundServer) -> None:
    body = {"ref": "main", "prompt": "Hello world", "max_tokens": 1, "prompt_logprobs": 1}
    status, _, answer = request(server.url + "/generate", body)
    assert status == 400 and "prompt_logprobs is not supported by /generate" in answer["error"]
    streamed = {"model": "main", "prompt": "Hello", "max_tokens": 2, "stream": True}
    status, _, text = request(server.url + "/v1/completions", streamed)
    assert status == 200 and sse_events(text)[-1][1] == "[DONE]"  # streams without it still work
