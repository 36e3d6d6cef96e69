"""Structured outputs over HTTP: OpenAI's response_format, vLLM's structured_outputs and guided_* fields."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from mintvcs.serve.app import BackgroundServer
from tests.serve.http_kit import gen, request, sse_events

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer"}},
    "required": ["answer", "score"],
    "additionalProperties": False,
}
CHAT: dict[str, Any] = {"model": "main", "messages": [{"role": "user", "content": "Well?"}]}


def _schema_ok(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"answer", "score"} and value["answer"] in ("yes", "no")


def test_openai_client_json_schema_chat_streamed_and_not(server: BackgroundServer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True},
    }
    messages: Any = CHAT["messages"]
    for seed in range(3):
        chat = client.chat.completions.create(
            model="main",
            messages=messages,
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            response_format=response_format,
        )
        text = chat.choices[0].message.content or ""
        assert chat.choices[0].finish_reason == "stop" and _schema_ok(text), text
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="main",
                messages=messages,
                max_tokens=120,
                temperature=1.0,
                seed=seed,
                response_format=response_format,
                stream=True,
            )
            if c.choices
        )
        assert streamed == text
    anything = client.chat.completions.create(
        model="main",
        messages=messages,
        max_tokens=200,
        temperature=0.8,
        seed=1,
        response_format={"type": "json_object"},
    )
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("field", "value", "check"),
    [
        ("structured_outputs", {"regex": "[a-c]{4}"}, lambda t: re.fullmatch("[a-c]{4}", t)),
        ("structured_outputs", {"choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ("guided_choice", ["up", "down"], lambda t: t in ("up", "down")),
        ("guided_regex", "x[0-9]{2}", lambda t: re.fullmatch("x[0-9]{2}", t)),
        ("guided_json", json.dumps(SCHEMA), _schema_ok),
        ("guided_grammar", 'start: "a" "b"+', lambda t: re.fullmatch("ab+", t)),
        (
            "structured_outputs",
            {"json": SCHEMA, "disable_any_whitespace": True, "backend": "xgrammar"},
            lambda t: _schema_ok(t) and "\n" not in t,
        ),
        ("guided_json", True, lambda t: json.loads(t) is not None),
    ],
)
def test_vllm_fields_on_completions_and_generate(
    server: BackgroundServer, field: str, value: Any, check: Any
) -> None:
    body = {"prompt": "Hello", "max_tokens": 60, "temperature": 0.9, "seed": 4, field: value}
    status, _, answer = request(server.url + "/v1/completions", {"model": "main", **body})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and check(choice["text"]), choice
    status, _, generated = gen(server, ref="main", **body)
    assert status == 200, generated
    assert generated["text"] == choice["text"]


def test_n_choices_each_follow_the_grammar(server: BackgroundServer) -> None:
    status, _, answer = request(
        server.url + "/v1/completions",
        {
            "model": "main",
            "prompt": "Pick",
            "n": 6,
            "max_tokens": 10,
            "temperature": 1.0,
            "seed": 9,
            "guided_choice": ["alpha", "beta", "gamma"],
        },
    )
    assert status == 200, answer
    texts = [c["text"] for c in answer["choices"]]
    assert len(texts) == 6 and set(texts) <= {"alpha", "beta", "gamma"}


def test_streamed_generate_follows_a_regex(server: BackgroundServer) -> None:
    status, _, text = request(
        server.url + "/generate",
        {
            "ref": "main",
            "prompt": "Code:",
            "max_tokens": 30,
            "temperature": 1.0,
            "seed": 2,
            "stream": True,
            "structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"},
        },
    )
    assert status == 200
    events = sse_events(text)
    joined = "".join(json.loads(data)["text"] for name, data in events if name is None)
    done = [json.loads(data) for name, data in events if name == "done"]
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", joined), events
    assert done[0]["text"] == joined and done[0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"guided_regex": "(["}, "regex"),
        ({"guided_json": "{not json"}, "not JSON"),
        ({"guided_json": {"type": "nonsense"}}, "nonsense"),
        ({"guided_choice": []}, "choice"),
        ({"guided_choice": "yes"}, "list"),
        ({"guided_grammar": "start: missing"}, "grammar"),
        ({"structured_outputs": {}}, "exactly one"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
        ({"structured_outputs": "a+"}, "structured_outputs"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "not several"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "not several"),
        ({"guided_json": False}, "admits no output"),
        ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "whitespace_pattern"),
        ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
        ({"structured_outputs": {"disable_any_whitespace": True}}, "exactly one"),
        # Past llguidance's limits at the first token, for every request that sends it: its
        # copies share the lexer's budget, and a row of thousands of alternatives.
        ({"guided_regex": "a{1000}{1000}"}, "too many expressions"),
        ({"guided_grammar": "start: " + " | ".join(f'"w{i}"' for i in range(2500))}, "max is"),
    ],
)
def test_malformed_structured_outputs_are_400(
    server: BackgroundServer, extra: dict[str, Any], words: str
) -> None:
    for url, body in (
        ("/v1/completions", {"model": "main", "prompt": "Hi", "max_tokens": 4}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 4}),
        ("/generate", {"ref": "main", "prompt": "Hi", "max_tokens": 4}),
    ):
        status, _, answer = request(server.url + url, {**body, **extra})
        assert status == 400, (url, extra, answer)
        message = answer["error"] if url == "/generate" else answer["error"]["message"]
        assert words in str(message), (url, extra, message)
    # Nothing was queued or left behind: the server answers the next request.
    assert gen(server, ref="main", prompt="Hi", max_tokens=2)[0] == 200


def test_a_limit_met_mid_output_fails_the_request_not_silently_stops(
    server: BackgroundServer,
) -> None:
    # Compiles, masks and takes a first token; the huge repetition is built one token later.
    body = {"ref": "main", "prompt": "Hi", "max_tokens": 8, "guided_regex": "[a-z]{2}a{1000}{1000}"}
    status, _, answer = request(server.url + "/generate", body)
    assert status == 422 and "too many expressions" in answer["error"], answer
    status, _, streamed = request(server.url + "/generate", {**body, "stream": True})
    if status == 200:  # the stream had started: an error event ends it
        names = [name for name, _ in sse_events(streamed)]
        assert "error" in names and "done" not in names, streamed
    else:
        assert status == 422 and "too many expressions" in streamed["error"], streamed
    # On /v1, a stream that has started ends with OpenAI's error object, coded as the status the
    # error would have had before streaming (not 500), and the metrics count that status.
    chat = {**CHAT, "max_tokens": 8, "stream": True, "guided_regex": "[a-z]{3}b{1000}{1000}"}
    status, _, text = request(server.url + "/v1/chat/completions", chat)
    if status == 200:
        errors = [json.loads(data)["error"] for _, data in sse_events(text) if '"error"' in data]
        assert errors and errors[0]["code"] == 422 and errors[0]["type"] != "server_error"
        metrics = request(server.url + "/metrics")[2]
        assert 'endpoint="/v1/chat/completions",status="422"' in metrics
    else:
        assert status == 422, text
    assert gen(server, ref="main", prompt="Hi", max_tokens=2)[0] == 200


def test_response_format_takes_vllm_options_beside_it(server: BackgroundServer) -> None:
    body = {
        "model": "main",
        "prompt": "Hello",
        "max_tokens": 80,
        "temperature": 1.0,
        "seed": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": SCHEMA}},
        "structured_outputs": {"disable_any_whitespace": True},
    }
    status, _, answer = request(server.url + "/v1/completions", body)
    assert status == 200, answer
    text = answer["choices"][0]["text"]
    assert _schema_ok(text) and text == json.dumps(json.loads(text)), text


def test_deep_grammars_and_schemas_do_not_bring_the_server_down(server: BackgroundServer) -> None:
    # Chains llguidance builds by recursion: they overflowed a thread's stack (SIGSEGV, the
    # whole server gone) at ~3500 rules or ~1000 $refs, inside the body limit.
    rules = "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(5000)) + '\nr5000: "a"'
    defs: dict[str, Any] = {
        f"d{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}},
            "required": ["a"],
        }
        for i in range(1500)
    }
    defs["d1500"] = {"type": "string"}
    schema = {"$ref": "#/$defs/d0", "$defs": defs}
    for extra in ({"guided_grammar": rules}, {"guided_json": schema}):
        status, _, answer = request(
            server.url + "/generate", {"ref": "main", "prompt": "Hi", "max_tokens": 2, **extra}
        )
        assert status in (200, 400), answer
    # A schema given as text nested past the JSON parser's depth is a 400, not a 500.
    nested = "[" * 5000 + "]" * 5000
    status, _, answer = request(
        server.url + "/generate", {"ref": "main", "prompt": "Hi", "guided_json": nested}
    )
    assert status == 400 and "not JSON" in answer["error"], answer
    assert gen(server, ref="main", prompt="Hi", max_tokens=2)[0] == 200


def test_slow_compiles_hold_up_neither_other_requests_nor_a_resent_failure(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time
    from concurrent.futures import ThreadPoolExecutor

    from mintvcs.serve import structured

    build = structured.Grammars._build
    built: list[str] = []

    def slow_build(self: Any, spec: Any) -> Any:
        built.append(spec.spec)
        if spec.spec.startswith("slow"):
            time.sleep(1.5)  # a schema that takes seconds to compile (thousands of properties)
        return build(self, spec)

    cached = {"ref": "main", "prompt": "Hi", "max_tokens": 2, "guided_regex": "c[0-9]"}
    assert gen(server, **cached)[0] == 200
    monkeypatch.setattr(structured.Grammars, "_build", slow_build)
    with ThreadPoolExecutor(8) as pool:
        slow = [
            pool.submit(gen, server, ref="main", prompt="Hi", max_tokens=2, guided_regex=f"slow{i}")
            for i in range(8)
        ]
        time.sleep(0.3)
        # Neither a request whose schema is cached, nor a ref looked up (worker-thread jobs
        # both), nor /v1/models waits for those compiles.
        for url, body in (
            ("/generate", cached),
            ("/generate", {"ref": "main~0", "prompt": "Hi", "max_tokens": 2}),
            ("/v1/models", None),
        ):
            started = time.monotonic()
            status, _, answer = request(server.url + url, body)
            assert status == 200, answer
            assert time.monotonic() - started < 1.0, url
        assert all(f.result()[0] == 200 for f in slow)
    # A spec that failed to compile is remembered: sent again, it is refused without compiling.
    bad = {"ref": "main", "prompt": "Hi", "max_tokens": 2, "guided_regex": "slow(["}
    first, second = gen(server, **bad), gen(server, **bad)
    assert first[0] == second[0] == 400 and first[2] == second[2], (first, second)
    assert built.count("slow([") == 1


def test_a_sentencepiece_base_serves_json_and_streams_its_text(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A Metaspace decoder with <0xNN> byte-fallback pieces: every structured request was a 422
    # (llguidance refused the tokenizer). Streamed deltas join into the text sent whole, which
    # is what the output adds to the prompt's decode.
    from tokenizers import Tokenizer

    from mintvcs import porcelain
    from mintvcs.serve.app import ServerConfig
    from tests.fixtures import build_base
    from tests.serve.test_structured import _sentencepiece_tokenizer

    base = build_base(tmp_path_factory.mktemp("sp-base") / "sp-llama", seed=4)
    (base / "tokenizer.json").write_text(_sentencepiece_tokenizer("metaspace").to_str())
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    repo = porcelain.init(tmp_path_factory.mktemp("sp-repo") / "repo", str(base))
    config = ServerConfig(repo=repo.work_tree or repo.git_dir, base_model=base, port=0)
    with BackgroundServer(config) as srv:
        body: dict[str, Any] = {
            "model": "sp-llama",
            "prompt": "The answer is",
            "max_tokens": 60,
            "temperature": 1.0,
            "return_token_ids": True,
        }
        for seed in range(3):
            for extra in (
                {},
                {
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "v", "schema": SCHEMA},
                    }
                },
            ):
                status, _, whole = request(
                    srv.url + "/v1/completions", {**body, **extra, "seed": seed}
                )
                assert status == 200, whole
                choice = whole["choices"][0]
                status, _, stream = request(
                    srv.url + "/v1/completions", {**body, **extra, "seed": seed, "stream": True}
                )
                chunks = [json.loads(d) for _, d in sse_events(stream) if d != "[DONE]"]
                assert (
                    "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
                    == choice["text"]
                )
                prompt = choice["prompt_token_ids"]
                shown = tokenizer.decode(prompt + choice["token_ids"])
                assert shown == tokenizer.decode(prompt) + choice["text"]
                if extra:
                    assert choice["finish_reason"] == "stop" and _schema_ok(choice["text"]), choice
