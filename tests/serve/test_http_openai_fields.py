"""Logprobs, echo, n, batched prompts and penalties over HTTP: what evaluation harnesses and RL rollouts send."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve.app import BackgroundServer, ServerConfig
from tests.serve.http_kit import gen, metric, request, sse_events


def _peft_logprobs(base: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of PEFT's logits at every position of `ids` [len, vocab]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _ids(base: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return list(Tokenizer.from_file(str(base / "tokenizer.json")).encode(text).ids)


def completions(server: BackgroundServer, **body: Any) -> tuple[int, Any]:
    status, _, answer = request(server.url + "/v1/completions", {"model": "main", **body})
    return status, answer


def test_echo_logprobs_score_token_prompts_as_lm_eval_asks(
    server: BackgroundServer, tiny_base: Path, adapters: dict[str, Path]
) -> None:
    # lm-eval-harness's loglikelihood request: token-id prompts, echo, logprobs=1, max_tokens=1.
    prompts = [_ids(tiny_base, "Hello world, the cat"), _ids(tiny_base, "A dog ran")]
    status, answer = completions(
        server, prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    assert status == 200, answer
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    for ids, choice in zip(prompts, answer["choices"], strict=True):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then one generated token
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = _peft_logprobs(tiny_base, adapters["a"], ids)
        for j in range(1, len(ids)):
            assert lp["token_logprobs"][j] == pytest.approx(
                float(expected[j - 1][ids[j]]), abs=1e-4
            )
            # The likeliest alternative plus the token itself (OpenAI's logprobs + 1 at most).
            top = lp["top_logprobs"][j]
            assert 1 <= len(top) <= 2
            assert max(top.values()) == pytest.approx(float(expected[j - 1].max()), abs=1e-4)
        # Greedy: the generated token is the likeliest after the prompt.
        assert lp["token_logprobs"][-1] == pytest.approx(float(expected[-1].max()), abs=1e-4)
        assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    assert answer["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)


def test_max_tokens_zero_with_echo_scores_the_prompt_only(server: BackgroundServer) -> None:
    status, answer = completions(server, prompt="Hello world", echo=True, logprobs=0, max_tokens=0)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["text"] == "Hello world"
    assert answer["usage"]["completion_tokens"] == 0
    prompt_tokens = answer["usage"]["prompt_tokens"]
    assert len(choice["logprobs"]["token_logprobs"]) == prompt_tokens
    # Without echo, max_tokens 0 is still a mistake.
    status, answer = completions(server, prompt="Hello world", max_tokens=0)
    assert status == 400 and "max_tokens" in answer["error"]["message"]


def _prefilled(server: BackgroundServer) -> float:
    return metric(server, "mint_prefill_tokens_total")


def test_n_choices_are_each_a_seeded_request(server: BackgroundServer) -> None:
    body = {"prompt": "Once upon", "max_tokens": 8, "temperature": 1.0, "seed": 41}
    before = _prefilled(server)
    status, answer = completions(server, n=3, **body)
    assert status == 200, answer
    # The three choices share one prefill of the prompt.
    assert _prefilled(server) - before == answer["usage"]["prompt_tokens"]
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    for j, choice in enumerate(answer["choices"]):
        alone = completions(server, **{**body, "seed": 41 + j})[1]
        assert choice["text"] == alone["choices"][0]["text"]
    assert len({c["text"] for c in answer["choices"]}) > 1  # different seeds, different samples
    one = completions(server, **body)[1]
    assert answer["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # counted once
    assert answer["usage"]["completion_tokens"] == sum(
        completions(server, **{**body, "seed": 41 + j})[1]["usage"]["completion_tokens"]
        for j in range(3)
    )


def test_several_prompts_with_n_keep_openai_order(server: BackgroundServer) -> None:
    prompts = ["The sky", "A cat sat", "Numbers: 1 2"]
    status, answer = completions(server, prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert status == 200, answer
    texts = [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])]
    for p, prompt in enumerate(prompts):
        alone = completions(server, prompt=prompt, max_tokens=5, temperature=0)[1]
        assert texts[2 * p] == texts[2 * p + 1] == alone["choices"][0]["text"]


def test_generate_logprobs_equal_peft(
    server: BackgroundServer, tiny_base: Path, adapters: dict[str, Path]
) -> None:
    status, _, answer = gen(
        server, prompt="Hello world", max_tokens=6, temperature=0, logprobs=3, ignore_eos=True
    )
    assert status == 200, answer
    prompt = _ids(tiny_base, "Hello world")
    tokens = [e["token_id"] for e in answer["logprobs"]]
    expected = _peft_logprobs(tiny_base, adapters["a"], prompt + tokens)
    for i, entry in enumerate(answer["logprobs"]):
        row = expected[len(prompt) - 1 + i]
        assert entry["logprob"] == pytest.approx(float(row[entry["token_id"]]), abs=1e-4)
        assert [t["token_id"] for t in entry["top_logprobs"]] == torch.topk(row, 3)[1].tolist()
        assert entry["top_logprobs"][0]["token_id"] == entry["token_id"]
    # Streaming sends each token's logprobs with its event.
    status, _, raw = gen(
        server,
        prompt="Hello world",
        max_tokens=6,
        temperature=0,
        logprobs=3,
        ignore_eos=True,
        stream=True,
    )
    streamed = [json.loads(d) for e, d in sse_events(raw) if e is None]
    assert [s["logprobs"] for s in streamed] == answer["logprobs"]


def test_streamed_choices_and_logprobs_add_up_to_the_whole(server: BackgroundServer) -> None:
    body = {"prompt": ["Hello world", "The sky"], "n": 2, "max_tokens": 6, "logprobs": 2}
    body.update(temperature=0.8, seed=5)
    status, whole = completions(server, **body)
    assert status == 200
    status, _, raw = request(
        server.url + "/v1/completions", {"model": "main", **body, "stream": True}
    )
    chunks = [json.loads(d) for _, d in sse_events(raw) if d != "[DONE]"]
    for choice in whole["choices"]:
        i = choice["index"]
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == choice["text"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        values = [v for c in mine if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
        assert tokens == choice["logprobs"]["tokens"]
        assert values == choice["logprobs"]["token_logprobs"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [choice["finish_reason"]]


def test_openai_client_chat_logprobs_and_n(server: BackgroundServer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages: Any = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(
        model="main", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    plain = gen(server, prompt="user: Hi\nassistant:", max_tokens=5, temperature=0, logprobs=3)[2]
    assert chat.choices[0].logprobs is not None
    content = chat.choices[0].logprobs.content
    assert content is not None
    assert [c.logprob for c in content] == [e["logprob"] for e in plain["logprobs"]]
    assert [c.token for c in content] == [e["token"] for e in plain["logprobs"]]
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token for c in content)
    assert (
        "".join(bytes(c.bytes or []).decode() for c in content) == chat.choices[0].message.content
    )

    many = client.chat.completions.create(
        model="main", messages=messages, max_tokens=5, temperature=0.9, seed=3, n=4
    )
    assert sorted(c.index for c in many.choices) == [0, 1, 2, 3]
    streamed: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model="main", messages=messages, max_tokens=5, temperature=0.9, seed=3, n=4, stream=True
    ):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert streamed == {c.index: c.message.content for c in many.choices}


def test_penalties_bias_and_min_tokens_over_http(server: BackgroundServer) -> None:
    body = {"prompt": "Hello world", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    plain = completions(server, **body)[1]["choices"][0]["text"]
    for extra in (
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 2.0, "presence_penalty": 1.0},
        {"logit_bias": {"300": 100}},
    ):
        status, answer = completions(server, **body, **extra)
        assert status == 200, answer
        over_generate = gen(server, ref="main", **body, **extra)[2]
        assert answer["choices"][0]["text"] == over_generate["text"] != plain, extra
    biased = gen(server, ref="main", **body, logit_bias={"300": 100}, return_token_ids=True)[2]
    assert biased["token_ids"] == [300] * 10
    first = gen(server, ref="main", **body, return_token_ids=True)[2]["token_ids"][0]
    stop_at_first = {"ref": "main", "prompt": "Hello world", "max_tokens": 10, "temperature": 0}
    stop_at_first["stop_token_ids"] = [first]
    stopped = gen(server, **stop_at_first)[2]
    assert stopped["usage"]["completion_tokens"] == 1 and stopped["finish_reason"] == "stop"
    held = gen(server, **stop_at_first, min_tokens=4)[2]
    assert held["usage"]["completion_tokens"] >= 4


def test_return_token_ids_on_openai_routes(server: BackgroundServer, tiny_base: Path) -> None:
    body = {"max_tokens": 6, "temperature": 0, "return_token_ids": True}
    expected = gen(server, ref="main", prompt="Hello world", **body)[2]["token_ids"]
    status, answer = completions(server, prompt="Hello world", **body)
    assert status == 200
    choice = answer["choices"][0]
    assert choice["token_ids"] == expected
    assert choice["prompt_token_ids"] == _ids(tiny_base, "Hello world")
    status, _, raw = request(
        server.url + "/v1/completions",
        {"model": "main", "prompt": "Hello world", **body, "stream": True},
    )
    chunks = [json.loads(d)["choices"] for _, d in sse_events(raw) if d != "[DONE]"]
    assert [t for c in chunks if c for t in c[0]["token_ids"]] == expected
    assert chunks[0][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    status, _, chat = request(
        server.url + "/v1/chat/completions",
        {"model": "main", "messages": [{"role": "user", "content": "Hi"}], **body},
    )
    plain = gen(server, ref="main", prompt="user: Hi\nassistant:", **body)[2]
    assert chat["choices"][0]["token_ids"] == plain["token_ids"]


def test_tokenize_and_detokenize(server: BackgroundServer, tiny_base: Path) -> None:
    status, _, answer = request(server.url + "/tokenize", {"prompt": "Hello world"})
    assert status == 200
    assert answer["tokens"] == _ids(tiny_base, "Hello world")
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 512
    chat = request(
        server.url + "/tokenize",
        {"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": True},
    )[2]
    assert chat["tokens"] == _ids(tiny_base, "user: Hi\nassistant:")
    assert len(chat["token_strs"]) == chat["count"]
    # The ids a completion reports for its prompt are the ids /tokenize gives.
    scored = completions(server, prompt="Hello world", max_tokens=1, return_token_ids=True)[1]
    assert scored["choices"][0]["prompt_token_ids"] == answer["tokens"]
    status, _, back = request(server.url + "/detokenize", {"tokens": answer["tokens"]})
    assert status == 200 and back["prompt"].endswith("Hello world")
    # The vocabulary is [0, vocab_size): its first id past the end and -1 are refused too.
    vocab = json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    status, _, back = request(server.url + "/detokenize", {"tokens": [0, vocab - 1]})
    assert status == 200, back
    for body in (
        {"tokens": [10**8]},
        {"tokens": [vocab]},
        {"tokens": [-1]},
        {"tokens": "abc"},
        {"tokens": [True]},
    ):
        status, _, bad = request(server.url + "/detokenize", body)
        assert status == 400 and "token" in bad["error"], body
    status, _, bad = request(server.url + "/tokenize", {"prompt": 5})
    assert status == 400


def test_min_tokens_lets_no_stop_string_end_inside_its_tokens(server: BackgroundServer) -> None:
    # vLLM's rule: a stop string counts only if it ends past the text of the first min_tokens
    # tokens; one that ended inside them is not looked for again later.
    body = {"prompt": "one two", "max_tokens": 12, "temperature": 0, "ref": "main"}
    free = gen(server, **body, ignore_eos=True, return_token_ids=True)[2]
    pieces = [
        request(server.url + "/detokenize", {"tokens": free["token_ids"][: i + 1]})[2]["prompt"]
        for i in range(len(free["token_ids"]))
    ]
    text = free["text"]
    # One stop string begins inside the first two tokens' text and ends past it: cut from where
    # it begins under min_tokens=2 too (the part inside them had been sent, and stayed).
    straddling = text[max(0, len(_text_of_first(free, pieces, 2)) - 2) :][:4]
    for stop in sorted({text[2:5], text[-4:-1], pieces[1][-3:], straddling} - {""}):
        for min_tokens in range(6):
            got = gen(server, **body, ignore_eos=True, stop=[stop], min_tokens=min_tokens)[2]
            protected = _text_of_first(free, pieces, min_tokens)
            at = text.find(stop, max(0, len(protected) - len(stop) + 1))
            expected = text if at == -1 else text[:at]
            assert got["text"] == expected, (stop, min_tokens, got["text"], expected)
            assert got["finish_reason"] == ("length" if at == -1 else "stop")


def _text_of_first(free: dict[str, Any], pieces: list[str], n: int) -> str:
    """The completion text of the first n generated tokens (pieces decode the ids alone)."""
    if n == 0:
        return ""
    whole = pieces[-1]
    return free["text"][: len(free["text"]) - (len(whole) - len(pieces[n - 1]))]


@pytest.mark.parametrize(
    ("route", "body", "word"),
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        (
            "/v1/completions",
            {"prompt": "x", "n": 1025, "max_tokens": 1},
            "1025 choices; at most 1024",
        ),
        ("/v1/completions", {"prompt": [True, 2]}, "prompt"),
        ("/v1/completions", {"prompt": [[]]}, "prompt"),
        ("/v1/completions", {"prompt": [10**9]}, "vocabulary"),
        ("/v1/completions", {"prompt": "x", "echo": "yes"}, "echo"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ("/generate", {"prompt": "x", "ref": "main", "logprobs": -1}, "logprobs"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": "high"}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, "vocabulary"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [1.5]}, "stop_token_ids"),
        ("/v1/completions", {"prompt": "x", "stop_token_ids": [10**7]}, "vocabulary"),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("/v1/completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 5}, "min_tokens"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"\u00b2": 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10**400}}, "logit_bias"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 60, "05": 60}}, "twice"),
        ("/v1/completions", {"prompt": "x", "logit_bias": {"5": True}}, "logit_bias"),
        (
            "/v1/completions",
            {"prompt": "x", "logit_bias": {str(t): 1 for t in range(301)}},
            "logit_bias has 301 entries; at most 300",
        ),
        ("/v1/completions", {"prompt": "x", "presence_penalty": 10**400}, "finite"),
        ("/v1/completions", {"prompt": "x", "temperature": -(10**400)}, "finite"),
        (
            "/v1/completions",
            {"prompt": "x", "stream": True, "stream_options": "x"},
            "stream_options",
        ),
        ("/v1/completions", {"prompt": "x", "n": 2, "best_of": True}, "best_of"),
        # A boolean field's neutral value is a boolean: 0 is a wrong type, not false.
        ("/v1/completions", {"prompt": "x", "include_stop_str_in_output": 0}, "(got 0)"),
        ("/v1/chat/completions", {"echo": 0}, "echo"),
        ("/v1/completions", {"prompt": "x", "echo": True, "max_tokens": False}, "max_tokens"),
        ("/detokenize", {}, "tokens"),
        # Each message names what the client sent, whole.
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens must be"),
        ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role is missing"),
        (
            "/v1/completions",
            {"prompt": "x", "tools": [{"type": "function", "function": {"name": "f" * 90}}]},
            "tools is not supported by this server; leave it out",
        ),
    ],
)
def test_bad_logprobs_n_and_prompts_are_400(
    server: BackgroundServer, route: str, body: dict[str, Any], word: str
) -> None:
    full = {"model": "main", **body} if route.startswith("/v1/") else body
    if route == "/v1/chat/completions":
        full.setdefault("messages", [{"role": "user", "content": "hi"}])
    status, _, answer = request(server.url + route, full)
    assert status == 400, answer
    message = answer["error"]["message"] if route.startswith("/v1/") else answer["error"]
    assert word in message
    # Nothing was left running.
    assert request(server.url + "/metrics")[2].count("mint_running 0") == 1


def test_legacy_logprobs_objects_with_colliding_texts_and_special_tokens(tiny_base: Path) -> None:
    from tokenizers import Tokenizer

    from mintvcs.serve.http_api import CompletionLogprobs, TokenTexts
    from mintvcs.serve.sampling import TokenLogprobs

    tokenizer = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    broken = [i for i in range(tokenizer.get_vocab_size()) if tokenizer.decode([i]) == "\ufffd"]
    a, b = broken[:2]  # two byte tokens that each decode alone to U+FFFD
    comma = tokenizer.token_to_id(",")
    chosen = TokenLogprobs(a, -4.5, ((a, -4.5), (b, -4.6), (comma, -4.62)))
    bos = tokenizer.token_to_id("<s>")
    texts = TokenTexts(tokenizer)
    out = CompletionLogprobs(texts, 0).chunk([(bos, None), (comma, None), (a, chosen)])
    # The likeliest of two ids with one text keeps its value; the chosen token is the max, as
    # lm-eval's greedy check reads it.
    assert out["top_logprobs"][2] == {"\ufffd": -4.5, ",": -4.62}
    assert max(out["top_logprobs"][2].values()) == out["token_logprobs"][2]
    # A special token the echoed text skips takes no characters: offsets index the text.
    assert out["tokens"][0] == "<s>" and out["text_offset"] == [0, 0, 1]


def test_a_repeated_prefix_is_served_from_the_cache_and_reported(server: BackgroundServer) -> None:
    shared = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(9)).tolist()
    body = {"max_tokens": 6, "temperature": 0, "logprobs": 1}
    status, first = completions(server, prompt=[*shared, 11, 12], **body)
    assert status == 200, first
    before = metric(server, "mint_prefix_cache_hit_tokens_total")
    status, second = completions(server, prompt=[*shared, 13, 14, 15], **body)
    assert status == 200, second
    # OpenAI's field: the prompt tokens whose keys and values were cached (the shared 40, in
    # whole blocks of 16).
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert metric(server, "mint_prefix_cache_hit_tokens_total") - before == 32
    # The same prompt again: the output is the same.
    status, again = completions(server, prompt=[*shared, 13, 14, 15], **body)
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert again["choices"][0]["text"] == second["choices"][0]["text"]
    assert again["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        second["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4
    )
    # Scoring a prompt (echo + logprobs) needs the cached positions' logprobs, which only a
    # scored prompt keeps: nothing cached the first time, then the shared whole blocks.
    scoring = {"echo": True, "logprobs": 1, "max_tokens": 0}
    status, scored = completions(server, prompt=[*shared, 13], **scoring)
    assert status == 200 and scored["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    status, other = completions(server, prompt=[*shared, 14, 15], **scoring)
    assert status == 200 and other["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    lps = [c["choices"][0]["logprobs"]["token_logprobs"] for c in (scored, other)]
    assert len(lps[1]) == 42 and lps[1][:40] == pytest.approx(lps[0][:40], abs=1e-4)


def test_a_cache_salt_keeps_tenants_apart(server: BackgroundServer) -> None:
    shared = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(10)).tolist()
    body = {"prompt": shared, "max_tokens": 2, "temperature": 0}
    assert completions(server, cache_salt="tenant-a", **body)[0] == 200
    # Another tenant, or no salt, gets nothing from tenant-a's prompt; tenant-a does.
    for salt, cached in (("tenant-b", 0), (None, 0), ("tenant-a", 32)):
        status, answer = completions(server, **({"cache_salt": salt} if salt else {}), **body)
        assert status == 200 and answer["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    for bad in ("", 5, "x" * 5000):
        status, answer = completions(server, cache_salt=bad, **body)
        assert status == 400 and "cache_salt" in answer["error"]["message"]


def test_token_ids_take_whole_number_floats_as_integer_fields_do(server: BackgroundServer) -> None:
    body = {"model": "main", "max_tokens": 3, "temperature": 0, "return_token_ids": True}
    ints = request(server.url + "/v1/completions", {**body, "prompt": [5, 40, 7]})
    floats = request(server.url + "/v1/completions", {**body, "prompt": [5.0, 40.0, 7.0]})
    assert ints[0] == floats[0] == 200
    assert floats[2]["choices"][0]["text"] == ints[2]["choices"][0]["text"]
    assert floats[2]["choices"][0]["prompt_token_ids"] == [5, 40, 7]
    assert request(server.url + "/detokenize", {"tokens": [5.0, 40]})[0] == 200
    for bad in ([5.5], [True], [[5.0]]):
        status, _, _ = request(server.url + "/v1/completions", {**body, "prompt": [bad[0], 7]})
        assert status == 400, bad


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_with_include_usage_every_chunk_carries_usage_null_until_the_last(
    server: BackgroundServer, route: str
) -> None:
    body: dict[str, Any] = {
        "model": "main",
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(
        {"prompt": "Hi"}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    status, _, text = request(server.url + route, body)
    assert status == 200
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1]), chunks
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_text_offsets_count_a_character_split_across_tokens_once(tiny_base: Path) -> None:
    from tokenizers import Tokenizer

    from mintvcs.serve.http_api import CompletionLogprobs, TokenTexts

    tokenizer = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    split = tokenizer.encode("մ", add_special_tokens=False).ids  # two bytes, two tokens
    comma = tokenizer.token_to_id(",")
    assert len(split) == 2 and tokenizer.decode(split) == "մ"
    ids = [comma, *split, comma, *split]
    out = CompletionLogprobs(TokenTexts(tokenizer), 0).chunk([(t, None) for t in ids])
    text = tokenizer.decode(ids)
    assert text == ",մ,մ"
    # Each token's offset is where its text starts; the first half of a character starts
    # where the character does.
    assert out["text_offset"] == [0, 1, 1, 2, 3, 3]
    # Without echo, the offsets follow the prompt's own text, decoded in context: a prompt that
    # ends inside a character leaves it to the token that completes it, whose text it starts.
    tail = CompletionLogprobs(TokenTexts(tokenizer), 5, [comma, split[0]]).chunk(
        [(split[1], None), (comma, None)]
    )
    assert tail["text_offset"] == [5, 6]


def test_a_token_prompt_that_ends_inside_a_character_gets_it_from_the_output(
    server: BackgroundServer, tiny_base: Path
) -> None:
    # A client continuing an output cut mid-character sends its ids back: the token that
    # completed the character added no text, and echo showed the prompt's half as U+FFFD.
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    ids = _ids(tiny_base, "Hello մ")
    prompt, last = ids[:-1], ids[-1]
    assert tokenizer.decode(prompt).endswith("\ufffd") and tokenizer.decode(ids).endswith("մ")
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logit_bias": {str(last): 100}}
    status, plain = completions(server, **body, logprobs=0, return_token_ids=True)
    assert status == 200, plain
    assert plain["choices"][0]["token_ids"] == [last]
    assert plain["choices"][0]["text"] == "մ"
    shown = tokenizer.decode(ids)  # the prompt's text up to the character, then the character
    assert plain["choices"][0]["logprobs"]["text_offset"] == [shown.index("մ")]
    _, _, streamed = request(
        server.url + "/v1/completions", {"model": "main", **body, "stream": True}
    )
    pieces = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["text"] for c in pieces if c["choices"]) == "մ"
    # Echo shows the prompt up to its last whole character: the character once, not U+FFFD.
    status, echoed = completions(server, **body, echo=True, logprobs=0)
    choice = echoed["choices"][0]
    assert choice["text"] == shown
    offsets = choice["logprobs"]["text_offset"]
    assert offsets[-2:] == [shown.index("մ")] * 2  # both halves start where the character does
    # Scoring the prompt alone, nothing completes it: it is echoed as it decodes.
    status, scored = completions(server, prompt=prompt, echo=True, logprobs=0, max_tokens=0)
    assert scored["choices"][0]["text"] == tokenizer.decode(prompt)


def test_echo_text_offsets_index_the_prompt_as_sent_under_a_normalizer(
    tiny_base: Path, repo: Any, tmp_path: Path
) -> None:
    # Echo returns a string prompt as sent, but its offsets counted the decoded prompt, which an
    # NFC normalizer makes shorter: "cafe" + U+0301 (7 characters) decodes to "café x" (6).
    import shutil

    from tokenizers import Tokenizer, normalizers

    base = tmp_path / "base-nfc"
    shutil.copytree(tiny_base, base)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.save(str(base / "tokenizer.json"))
    prompt = "cafe\u0301 x, a cat"
    assert tokenizer.decode(tokenizer.encode(prompt).ids) != prompt
    config = ServerConfig(repo=repo.git_dir, base_model=base, port=0, max_model_len=64)
    body = {"model": "main", "prompt": prompt, "temperature": 0, "logprobs": 0}
    with BackgroundServer(config) as srv:
        answers = [
            request(srv.url + "/v1/completions", {**body, **extra})[2]
            for extra in (
                {"max_tokens": 3, "ignore_eos": True},
                {"max_tokens": 3, "ignore_eos": True, "echo": True},
                {"max_tokens": 0, "echo": True},
            )
        ]
    plain, echoed, scored = (a["choices"][0] for a in answers)
    assert echoed["text"] == prompt + plain["text"] and scored["text"] == prompt
    generated = len(plain["logprobs"]["tokens"])
    # The completion's offsets are the same with echo as without: from the end of the prompt.
    assert echoed["logprobs"]["text_offset"][-generated:] == plain["logprobs"]["text_offset"]
    assert plain["logprobs"]["text_offset"][0] == len(prompt)
    # Each prompt token's offset is where its text stands in the prompt as echoed.
    for lp in (echoed["logprobs"], scored["logprobs"]):
        offsets = lp["text_offset"][: len(scored["logprobs"]["tokens"])]
        assert offsets == sorted(offsets)
        tokens = lp["tokens"][: len(offsets)]
        for token, at in zip(tokens, offsets, strict=True):
            if token.isascii():  # "é" is the composed form, which the prompt does not hold
                assert prompt[at : at + len(token)] == token, (token, at)
        assert offsets[-1] == len(prompt) - len(tokens[-1])  # past the "é": off by one it was


def test_sentencepiece_token_texts_keep_their_leading_space() -> None:
    # Decoded alone (as vLLM names them), a Llama-2-style token lost its leading space: "▁is"
    # was "is", "▁" nothing, so the tokens did not join into the text they make.
    from mintvcs.serve.http_api import CompletionLogprobs, TokenTexts
    from mintvcs.serve.sampling import TokenLogprobs
    from tests.serve.test_sampling import _byte_fallback_tokenizer

    tokenizer, vocab = _byte_fallback_tokenizer()
    prompt = tokenizer.encode("The").ids
    output = [
        vocab["▁answer"],
        vocab["▁is"],
        vocab["▁"],
        3 + ord("x"),
        *(3 + b for b in "é".encode()),
    ]
    chosen = TokenLogprobs(vocab["▁is"], -1.0, ((vocab["▁is"], -1.0), (vocab["▁"], -2.0)))
    out = CompletionLogprobs(TokenTexts(tokenizer), 0, prompt).chunk(
        [(t, chosen if t == vocab["▁is"] else None) for t in output]
    )
    assert out["tokens"][:4] == [" answer", " is", " ", "x"]
    shown = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    assert shown == " answer is xé"
    assert "".join(out["tokens"][:4]) == shown[:-1]
    assert out["top_logprobs"][1] == {" is": -1.0, " ": -2.0}
    assert out["text_offset"] == [0, 7, 10, 11, 12, 12]


def test_tokenize_s_token_strs_join_into_the_text_they_tokenize() -> None:
    # /tokenize named each token as it reads after a word, the first too: "The answer" gave
    # [" The", " answer"], which does not join into "The answer".
    from mintvcs.serve.http_api import TokenTexts
    from tests.serve.test_sampling import _byte_fallback_tokenizer

    tokenizer, _ = _byte_fallback_tokenizer()
    for text, specials in (("The answer is", True), ("The answer is", False), ("Hello", True)):
        ids = tokenizer.encode(text, add_special_tokens=specials).ids
        strs = TokenTexts(tokenizer).in_text([1, *ids] if specials else ids)
        assert "".join(strs[1:] if specials else strs) == text, strs


@pytest.mark.parametrize("kind", ["llama2", "metaspace", "byte_fallback"])
def test_an_echoed_sentencepiece_prompt_s_tokens_join_into_the_echoed_text(kind: str) -> None:
    # In context a SentencePiece token keeps its leading space ("▁The" is " The"), but at the
    # start of a text it has none: the first token of an echoed prompt (after BOS) read " The"
    # while the echoed text was "The answer is".
    from mintvcs.serve.http_api import CompletionLogprobs, TokenTexts
    from mintvcs.serve.sampling import TokenLogprobs
    from tests.serve.test_sampling import _byte_fallback_tokenizer
    from tests.serve.test_structured import _sentencepiece_tokenizer

    if kind == "byte_fallback":
        tokenizer = _byte_fallback_tokenizer()[0]  # "▁" is a token of its own there
    else:
        tokenizer = _sentencepiece_tokenizer(kind)
    bos = tokenizer.token_to_id("<s>")
    words = tokenizer.encode("The answer is", add_special_tokens=False).ids
    prompt = [bos, *words, *words[:1]]  # the first token again, inside the text
    echoed = tokenizer.decode(prompt)
    assert echoed.startswith("The answer is")
    texts = TokenTexts(tokenizer)
    first = TokenLogprobs(words[0], -1.0, ((words[1], -0.5), (words[0], -1.0)))
    entries = [(bos, None), (words[0], first), *((t, None) for t in prompt[2:])]
    offsets = texts.prompt_offsets(prompt, prompt, True)
    out = CompletionLogprobs(texts, len(echoed), prompt, offsets).chunk([], entries)
    assert "".join(out["tokens"][1:]) == echoed, out["tokens"]
    assert out["tokens"][0] == "<s>"
    # Each token reads as its part of the echoed text, and its alternatives with it.
    for token, at in zip(out["tokens"][1:], out["text_offset"][1:], strict=True):
        assert echoed[at:].startswith(token), (token, at, echoed)
    assert set(out["top_logprobs"][1]) == {
        texts.at_start(words[1]),
        out["tokens"][1],
    }
    assert out["tokens"][-1] != out["tokens"][1]  # the same token later: its space kept


# vLLM's request fields that change the output and that this server does not implement, each
# with a value that would change it and its neutral value (accepted: it changes nothing).
_VLLM_UNIMPLEMENTED: list[tuple[str, Any, Any]] = [
    ("use_beam_search", True, False),
    ("length_penalty", 0.5, 1.0),
    ("bad_words", ["world"], []),
    ("truncate_prompt_tokens", 2, None),
    ("return_tokens_as_token_ids", True, False),
    ("logits_processors", ["some.module.Processor"], []),
    ("vllm_xargs", {"k": 1}, {}),
    ("structural_tag", '{"structures": []}', None),
    ("documents", [{"title": "t", "text": "x"}], []),
    ("prompt_embeds", "AAAA", None),
]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/generate"])
@pytest.mark.parametrize(("field", "changing", "neutral"), _VLLM_UNIMPLEMENTED)
def test_vllm_fields_that_would_change_the_output_are_refused_unless_neutral(
    server: BackgroundServer, route: str, field: str, changing: Any, neutral: Any
) -> None:
    body: dict[str, Any] = {"max_tokens": 2, "temperature": 0}
    if route == "/v1/chat/completions":
        body |= {"model": "main", "messages": [{"role": "user", "content": "hi"}]}
    else:
        body |= {"prompt": "Hello world"}
        body |= {"model": "main"} if route == "/v1/completions" else {"ref": "main"}
    status, _, answer = request(server.url + route, {**body, field: changing})
    assert status == 400, answer
    message = answer["error"]["message"] if route.startswith("/v1/") else answer["error"]
    assert message.startswith(f"{field} is not supported"), message
    status, _, answer = request(server.url + route, {**body, field: neutral})
    assert status == 200, answer


def test_allowed_token_ids_restrict_what_is_generated(server: BackgroundServer) -> None:
    allowed = [5, 6, 300]
    body = {"prompt": "Hello world", "max_tokens": 12, "ignore_eos": True}
    plain = gen(server, ref="main", **body, temperature=0, return_token_ids=True)[2]
    assert not set(plain["token_ids"]) <= set(allowed)  # the restriction has work to do
    for sampling in ({"temperature": 0}, {"temperature": 2.0, "seed": 3}):
        got = gen(
            server,
            ref="main",
            **body,
            **sampling,
            allowed_token_ids=allowed,
            return_token_ids=True,
        )[2]
        assert set(got["token_ids"]) <= set(allowed), (sampling, got)
        status, answer = completions(
            server, **body, **sampling, allowed_token_ids=allowed, return_token_ids=True
        )
        assert status == 200, answer
        assert answer["choices"][0]["token_ids"] == got["token_ids"]
    sampled = gen(
        server,
        ref="main",
        **body,
        temperature=5.0,
        seed=1,
        allowed_token_ids=allowed,
        return_token_ids=True,
    )[2]["token_ids"]
    assert len(set(sampled)) > 1  # a draw among them, not one token forced
    status, _, chat = request(
        server.url + "/v1/chat/completions",
        {
            "model": "main",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
            "allowed_token_ids": [300],
            "return_token_ids": True,
        },
    )
    assert status == 200 and chat["choices"][0]["token_ids"] == [300] * 6, chat


def test_allowed_token_ids_no_structured_output_allows_are_422_not_ignored(
    server: BackgroundServer, tiny_base: Path
) -> None:
    letters = _ids(tiny_base, "x") + _ids(tiny_base, "y")
    body = {"prompt": "Hi", "max_tokens": 6, "allowed_token_ids": letters, "temperature": 0}
    status, answer = completions(server, **body, structured_outputs={"regex": "[0-9]{3}"})
    assert status == 422, answer
    assert "allowed_token_ids and the regex structured output leave no token" in str(answer)
    status, answer = completions(
        server, **body, structured_outputs={"regex": "[x-y][0-9]"}, return_token_ids=True
    )
    assert status == 422, answer  # after the first token, as at once
    digits = _ids(tiny_base, "4") + _ids(tiny_base, "7")
    status, answer = completions(
        server,
        **{**body, "allowed_token_ids": digits},
        structured_outputs={"regex": "[0-9]{3}"},
        return_token_ids=True,
    )
    assert status == 200, answer
    assert set(answer["choices"][0]["token_ids"]) <= set(digits), answer


@pytest.mark.parametrize(
    ("extra", "word"),
    [
        ({"allowed_token_ids": []}, "allowed_token_ids must be a non-empty list"),
        ({"allowed_token_ids": [1.5]}, "allowed_token_ids must be a non-empty list"),
        ({"allowed_token_ids": "5"}, "allowed_token_ids"),
        ({"allowed_token_ids": [10**7]}, "allowed token id 10000000 is outside the vocabulary"),
        ({"allowed_token_ids": [7], "stop_token_ids": [7], "min_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_allowed_token_ids_are_400(
    server: BackgroundServer, extra: dict[str, Any], word: str
) -> None:
    status, answer = completions(server, prompt="x", max_tokens=4, **extra)
    assert status == 400, answer
    assert word in answer["error"]["message"]
