"""Tool calls on /v1/chat/completions: a named function or "required", enforced as structured outputs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mintvcs.serve.app import BackgroundServer, HTTPError
from mintvcs.serve.http_chat import (
    MAX_TOOLS,
    TOOL_CALL_FORMATS,
    HermesFormat,
    Llama3JsonFormat,
    chat_message,
    offered_tools,
    parse_tools,
    render_chat,
)
from tests.serve.http_kit import request

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
DICE = {
    "type": "function",
    "function": {
        "name": "roll",
        "parameters": {
            "type": "object",
            "properties": {"sides": {"enum": [6, 20]}},
            "required": ["sides"],
            "additionalProperties": False,
        },
    },
}
MESSAGES: Any = [{"role": "user", "content": "Weather in Paris?"}]


def _valid(name: str, arguments: str) -> bool:
    """Whether a call's arguments fit its tool's schema, checked by hand."""
    args = json.loads(arguments)
    if name == "get_weather":
        return (
            set(args) == {"city", "unit"}
            and isinstance(args["city"], str)
            and len(args["city"]) <= 12
            and args["unit"] in ("celsius", "fahrenheit")
        )
    if name == "roll":
        return args in ({"sides": 6}, {"sides": 20})
    return name == "get_time" and args in ({"zone": "UTC"}, {"zone": "CET"})


def _client(server: BackgroundServer) -> Any:
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_a_named_function_is_called_with_valid_arguments(server: BackgroundServer) -> None:
    client = _client(server)
    choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(3):
        kwargs: Any = {
            "model": "main",
            "messages": MESSAGES,
            "tools": [WEATHER, CLOCK],
            "tool_choice": choice,
            "max_tokens": 80,
            "temperature": 1.0,
            "seed": seed,
        }
        reply = client.chat.completions.create(**kwargs)
        out = reply.choices[0]
        assert out.finish_reason == "stop" and out.message.content is None
        (call,) = out.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name == "get_weather" and _valid(
            "get_weather", call.function.arguments
        )
        # Streamed: the arguments arrive in pieces under one id, and add up to the same call.
        pieces: list[Any] = []
        reasons = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                pieces.extend(c.delta.tool_calls or [])
                reasons.append(c.finish_reason)
        assert pieces[0].id and pieces[0].function.name == "get_weather"
        assert {p.index for p in pieces} == {0} and all(
            p.id in (None, pieces[0].id) for p in pieces
        )
        assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
        assert [r for r in reasons if r] == ["stop"]


def test_required_calls_one_or_more_tools(server: BackgroundServer) -> None:
    client = _client(server)
    for seed in range(4):
        # parallel_tool_calls=False: exactly one call, so the list closes within max_tokens.
        kwargs: Any = {
            "model": "main",
            "messages": MESSAGES,
            "tools": [CLOCK, DICE],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 150,
            "temperature": 1.0,
            "seed": seed,
        }
        out = client.chat.completions.create(**kwargs).choices[0]
        assert out.finish_reason == "tool_calls" and out.message.content is None
        (call,) = out.message.tool_calls
        assert _valid(call.function.name, call.function.arguments)
        streamed: list[Any] = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for c in chunk.choices:
                streamed.extend(c.delta.tool_calls or [])
        assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == [
            (0, call.function.name, call.function.arguments)
        ]
    # Several calls in one reply; one cut short by max_tokens comes back as text.
    for seed in range(4):
        out = client.chat.completions.create(
            model="main",
            messages=MESSAGES,
            tools=[CLOCK, DICE],
            tool_choice="required",
            max_tokens=60,
            temperature=1.0,
            seed=seed,
        ).choices[0]
        if out.finish_reason == "length":
            assert out.message.tool_calls is None and out.message.content.startswith('[{"name": ')
        else:
            calls = out.message.tool_calls
            assert out.finish_reason == "tool_calls" and calls
            assert all(_valid(c.function.name, c.function.arguments) for c in calls)
            assert len({c.id for c in calls}) == len(calls)


def test_tools_reach_the_prompt_and_none_answers_in_text(server: BackgroundServer) -> None:
    plain = {"model": "main", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}
    status, _, without = request(server.url + "/v1/chat/completions", plain)
    assert status == 200
    status, _, offered = request(
        server.url + "/v1/chat/completions", {**plain, "tools": [WEATHER], "tool_choice": "none"}
    )
    assert status == 200, offered
    message = offered["choices"][0]["message"]
    assert isinstance(message["content"], str) and "tool_calls" not in message
    assert offered["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    status, _, counted = request(
        server.url + "/tokenize", {"messages": MESSAGES, "tools": [WEATHER]}
    )
    assert status == 200 and counted["count"] == offered["usage"]["prompt_tokens"]


def test_a_conversation_with_earlier_tool_calls_continues(server: BackgroundServer) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    status, _, answer = request(
        server.url + "/v1/chat/completions",
        {"model": "main", "messages": messages, "tools": [WEATHER], "tool_choice": "none"},
    )
    assert status == 200, answer


def test_templates_see_tools_and_calls_as_objects() -> None:
    config = {
        "chat_template": (
            "{% if tools %}<tools>{{ tools | map(attribute='function') | map(attribute='name') "
            "| join(',') }}</tools>{% endif %}"
            "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
            "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}"
            "({{ c.function.arguments.city }})</call>{% endfor %}"
            "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}[assistant]"
        )
    }
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "cold", "tool_call_id": "c1"},
    ]
    assert render_chat(messages, config, [WEATHER, CLOCK]) == (
        "<tools>get_weather,get_time</tools>[user]hi[assistant]<call>get_weather(Oslo)</call>"
        "[tool]cold#c1[assistant]",
        True,
    )
    text, templated = render_chat(messages, {}, [WEATHER])
    assert not templated
    lines = text.split("\n")
    assert json.loads(lines[0].removeprefix("tools: ")) == [WEATHER]
    assert (
        lines[2]
        == 'assistant: tool_calls: [{"name": "get_weather", "arguments": {"city": "Oslo"}}]'
    )
    assert lines[3:] == ["tool: cold", "assistant:"]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"tools": [WEATHER]}, '"auto"'),
        ({"tools": [WEATHER], "tool_choice": "auto"}, '"auto"'),
        ({"tool_choice": "required"}, "needs a non-empty list of tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "not in tools",
        ),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice must be"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools[0]"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "same name"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "without response_format",
        ),
        ({"tools": "get_weather", "tool_choice": "required"}, "tools"),
        ({"tools": [DICE], "tool_choice": "required", "stop": ["x"]}, "stop"),
        (
            {
                "tools": [DICE],
                "tool_choice": {"type": "function", "function": {"name": "roll"}},
                "stop_token_ids": [5],
            },
            "stop",
        ),
        (
            {"tools": [DICE], "tool_choice": {"type": "custom", "function": {"name": "roll"}}},
            "tool_choice must be",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ],
                "tool_choice": "required",
            },
            "of an object",
        ),
        (
            {
                "messages": [{"role": "assistant", "content": "x", "tool_calls": {}}],
                "tools": [DICE],
                "tool_choice": "none",
            },
            "tool_calls must be a list",
        ),
    ],
)
def test_malformed_tool_requests_are_400(
    server: BackgroundServer, extra: dict[str, Any], words: str
) -> None:
    body = {"model": "main", "messages": MESSAGES, "max_tokens": 4, **extra}
    status, _, answer = request(server.url + "/v1/chat/completions", body)
    assert status == 400 and words in answer["error"]["message"], answer


def test_completions_and_generate_refuse_tools(server: BackgroundServer) -> None:
    for url, body in (
        ("/v1/completions", {"model": "main", "tools": [WEATHER]}),
        ("/v1/completions", {"model": "main", "tool_choice": "required"}),
        ("/generate", {"tools": [WEATHER], "tool_choice": "required"}),
    ):
        status, _, answer = request(server.url + url, {"prompt": "Hi", "max_tokens": 2, **body})
        assert status == 400 and "tool" in json.dumps(answer), (url, answer)


def test_tools_render_as_transformers_renders_them(tiny_base: Any) -> None:
    from transformers import PreTrainedTokenizerFast

    # A Qwen2.5-style template: tools as JSON lines in the system turn, earlier calls as JSON.
    template = (
        "{%- if tools %}<|system|>Tools:\n{%- for tool in tools %}{{ tool | tojson }}\n"
        "{%- endfor %}{%- endif %}"
        "{%- for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}"
        "{%- for call in m.tool_calls or [] %}<tool_call>"
        "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}"
        "</tool_call>{%- if loop.index > 3 %}{% break %}{% endif %}{%- endfor %}"
        "{%- endfor %}{%- if add_generation_prompt %}<|assistant|>{%- endif %}"
    )
    tools = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "description": "Weather <in> a city & 'region', e.g. Zürich",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [
        {"role": "user", "content": "Wie ist das Wetter in Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 °C"},
    ]
    checked = [chat_message(m, i) for i, m in enumerate(messages)]
    ours, templated = render_chat(checked, {"chat_template": template}, tools)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tiny_base / "tokenizer.json"))
    hf.chat_template = template
    # transformers takes earlier calls' arguments as objects, as render_chat hands them over.
    for m in messages:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    expected = hf.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert templated and ours == expected
    assert "Zürich" in ours and "<in>" in ours


def test_the_plain_template_writes_tools_and_calls_as_json_text() -> None:
    tool = {"type": "function", "function": {"name": "go", "description": "Reise nach Zürich"}}
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "go", "arguments": {"to": "Zürich"}},
    }
    messages = [
        {"role": "user", "content": "Los!"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]
    prompt, templated = render_chat(messages, {}, [tool])
    assert not templated
    lines = prompt.split("\n")
    # Non-ASCII as it is (an escape would cost tokens), and each line's JSON reads back.
    assert "Zürich" in lines[0] and "\\u" not in prompt
    assert json.loads(lines[0].removeprefix("tools: ")) == [tool]
    assert json.loads(lines[2].split("tool_calls: ", 1)[1]) == [call["function"]]


def test_hermes_replies_are_read_for_calls() -> None:
    hermes_calls = HermesFormat().calls
    text = 'Let me check.\n<tool_call>\n{"name": "roll", "arguments": {"sides": 6}}\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>'
    found = hermes_calls(text)
    assert found is not None
    content, calls = found
    assert content == "Let me check.\n"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("roll", {"sides": 6}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert hermes_calls('<tool_call>{"name": "roll", "arguments": {}}</tool_call>')[0] is None  # type: ignore[index]
    for text in (
        "no calls here",
        '<tool_call>{"name": "roll", "arguments": {"sides": 6}}',  # cut short
        "<tool_call>not json</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
    ):
        assert hermes_calls(text) is None, text
    # Text after the calls is dropped, as vLLM's parser drops it; arguments keep non-ASCII.
    after = hermes_calls(
        '<tool_call>{"name": "go", "arguments": {"to": "Zürich"}}</tool_call> Done!'
    )
    assert after is not None and after[1][0]["function"]["arguments"] == '{"to": "Zürich"}'


def test_text_that_may_start_a_call_is_held_back() -> None:
    streamable = HermesFormat().streamable
    assert streamable("hello") == 5
    assert streamable("hello <tool") == 6
    assert streamable("hello <tool_call>{") == 6
    assert streamable("a <b") == 4
    llama = Llama3JsonFormat().streamable
    for maybe_calls in ("", "  ", '{"na', " <|pyth", '<|python_tag|>{"name"'):
        assert llama(maybe_calls) == 0, maybe_calls
    assert llama("Paris is sunny") == len("Paris is sunny")
    assert llama(" <b>") == 4


def test_a_tail_one_short_of_the_call_marker_is_held_back() -> None:
    """Text ending in all of <tool_call> but its last character is held back until it is known."""
    streamable = HermesFormat().streamable
    assert streamable("ok <tool_call") == 3
    assert streamable("ok <tool_cal") == 3
    assert streamable("ok tool_call") == len("ok tool_call")


def test_blank_text_before_a_call_is_no_content() -> None:
    """Only whitespace before the first call gives content null, as for no text at all."""
    found = HermesFormat().calls('\n\n<tool_call>{"name": "roll", "arguments": {}}</tool_call>')
    assert found is not None and found[0] is None and len(found[1]) == 1


def test_llama3_json_replies_are_read_for_calls() -> None:
    calls = Llama3JsonFormat().calls

    def named(text: str) -> list[tuple[str, Any]] | None:
        found = calls(text)
        if found is None:
            return None
        assert found[0] is None  # the calls are the whole reply: no content
        return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in found[1]]

    assert named('{"name": "roll", "parameters": {"sides": 6}}') == [("roll", {"sides": 6})]
    assert named('<|python_tag|>{"name": "roll", "arguments": {"sides": 20}}') == [
        ("roll", {"sides": 20})
    ]
    assert named(
        ' {"name": "roll", "parameters": {}}; {"name": "get_time", "parameters": {"zone": "UTC"}};\n'
    ) == [
        ("roll", {}),
        ("get_time", {"zone": "UTC"}),
    ]
    assert named('{"name": "go", "parameters": {"to": "Zürich"}}') == [("go", {"to": "Zürich"})]
    for text in (
        "It is sunny in Paris.",
        'Sure: {"name": "roll", "parameters": {}}',  # text first: the reply is text
        '{"name": "roll", "parameters": {}} and more',  # text after a call
        '{"name": "roll", "parameters": {"sides": 6}',  # cut short
        '{"parameters": {}}',  # no name
        '{"name": "roll"}; nonsense',
        "<|python_tag|>",
    ):
        assert calls(text) is None, text


def test_the_cli_offers_every_tool_call_parser() -> None:
    from mintvcs.serve.cli import serve

    option = next(p for p in serve.params if p.name == "tool_call_parser")
    assert list(option.type.choices) == list(TOOL_CALL_FORMATS)  # type: ignore[attr-defined]


def _parser_server(repo: Any, tiny_base: Any, parser: str) -> BackgroundServer:
    """A server that reads tool_choice "auto" replies with `parser`."""
    from mintvcs.serve.app import ServerConfig

    config = ServerConfig(
        repo=repo.work_tree or repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        max_tokens_limit=400,
        tool_call_parser=parser,
    )
    return BackgroundServer(config)


def _auto(regex: str, seed: int) -> dict[str, Any]:
    """A chat request offering DICE under tool_choice "auto", whose reply the regex forces
    (the tiny model writes no calls of its own)."""
    return {
        "model": "main",
        "messages": MESSAGES,
        "tools": [DICE],
        "max_tokens": 100,
        "temperature": 0.8,
        "seed": seed,
        "extra_body": {"structured_outputs": {"regex": regex}},
    }


def _streamed(client: Any, kwargs: dict[str, Any]) -> tuple[str, list[Any], list[str]]:
    """A streamed chat reply's content, tool-call deltas and finish reasons, in order."""
    content, calls, reasons = "", [], []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            calls.extend(c.delta.tool_calls or [])
            if c.finish_reason:
                reasons.append(c.finish_reason)
    return content, calls, reasons


@pytest.fixture(scope="module")
def hermes_server(repo: Any, tiny_base: Any) -> Any:
    with _parser_server(repo, tiny_base, "hermes") as srv:
        yield srv


def test_auto_reads_calls_with_the_hermes_parser(hermes_server: BackgroundServer) -> None:
    client = _client(hermes_server)
    call = r'Checking\. <tool_call>\{"name": "roll", "arguments": \{"sides": (6|20)\}\}</tool_call>'
    kwargs = _auto(call, seed=2)  # one call after some text
    out = client.chat.completions.create(**kwargs).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content == "Checking. "
    (made,) = out.message.tool_calls
    assert made.function.name == "roll" and _valid("roll", made.function.arguments)
    content, streamed, reasons = _streamed(client, kwargs)
    assert content == "Checking. " and reasons == ["tool_calls"]
    assert [(c.function.name, c.function.arguments) for c in streamed] == [
        ("roll", made.function.arguments)
    ]
    # Blank text before a call is no content, streamed or not.
    kwargs["extra_body"] = {
        "structured_outputs": {
            "regex": r'\n\n<tool_call>\{"name": "roll", "arguments": \{\}\}</tool_call>'
        }
    }
    lead = client.chat.completions.create(**kwargs).choices[0]
    assert lead.message.content is None and lead.message.tool_calls
    streamed_content = [
        c.delta.content
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for c in chunk.choices
        if c.delta.content
    ]
    assert streamed_content == []
    # Two calls: both come back, or with parallel_tool_calls false only the first (as vLLM).
    two = r'<tool_call>\{"name": "roll", "arguments": \{"sides": 6\}\}</tool_call>' * 2
    kwargs.update(extra_body={"structured_outputs": {"regex": two}}, max_tokens=300)
    both = client.chat.completions.create(**kwargs).choices[0]
    assert both.finish_reason == "tool_calls" and len(both.message.tool_calls) == 2
    single = {**kwargs, "parallel_tool_calls": False}
    one = client.chat.completions.create(**single).choices[0]
    assert len(one.message.tool_calls) == 1 and one.finish_reason == "tool_calls"
    streamed = [
        call
        for chunk in client.chat.completions.create(**single, stream=True)
        for c in chunk.choices
        for call in c.delta.tool_calls or []
    ]
    assert [(c.index, c.function.arguments) for c in streamed] == [(0, '{"sides": 6}')]
    # A reply without a call is text; "auto" is what a request with tools gets by default.
    kwargs["extra_body"] = {"structured_outputs": {"regex": "Hi <tool [a-z]{3}"}}
    plain = client.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "stop" and plain.message.tool_calls is None
    assert plain.message.content.startswith("Hi <tool ")
    text = "".join(
        c.delta.content or ""
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for c in chunk.choices
    )
    assert text == plain.message.content


@pytest.fixture(scope="module")
def llama3_server(repo: Any, tiny_base: Any) -> Any:
    with _parser_server(repo, tiny_base, "llama3_json") as srv:
        yield srv


def test_auto_reads_calls_with_the_llama3_json_parser(llama3_server: BackgroundServer) -> None:
    client = _client(llama3_server)
    two = r'\{"name": "roll", "parameters": \{"sides": (6|20)\}\}; \{"name": "roll", "parameters": \{"sides": 6\}\}'
    kwargs = _auto(two, seed=3)  # two calls, the whole reply
    out = client.chat.completions.create(**kwargs).choices[0]
    assert out.finish_reason == "tool_calls" and out.message.content is None
    assert [c.function.name for c in out.message.tool_calls] == ["roll", "roll"]
    assert all(_valid("roll", c.function.arguments) for c in out.message.tool_calls)
    content, streamed, reasons = _streamed(client, kwargs)
    assert content == "" and reasons == ["tool_calls"]
    assert [(c.index, c.function.arguments) for c in streamed] == [
        (k, call.function.arguments) for k, call in enumerate(out.message.tool_calls)
    ]
    single = client.chat.completions.create(**kwargs, parallel_tool_calls=False).choices[0]
    assert len(single.message.tool_calls) == 1
    # A reply that is not calls is text, streamed as it comes once it cannot be a call.
    kwargs["extra_body"] = {"structured_outputs": {"regex": "Roll a [a-z]{12}"}}
    plain = client.chat.completions.create(**kwargs).choices[0]
    assert plain.finish_reason == "length" or plain.finish_reason == "stop"
    assert plain.message.tool_calls is None and plain.message.content.startswith("Roll a ")
    pieces = [
        c.delta.content
        for chunk in client.chat.completions.create(**kwargs, stream=True)
        for c in chunk.choices
        if c.delta.content
    ]
    assert "".join(pieces) == plain.message.content and len(pieces) > 1


def test_an_unknown_tool_call_parser_is_refused(tiny_base: Any, tmp_path: Any) -> None:
    from mintvcs.serve.app import ServerConfig, ServerError

    with pytest.raises(ServerError, match="tool_call_parser 'mistral' is not one"):
        ServerConfig(repo=tmp_path, base_model=tiny_base, tool_call_parser="mistral")


def test_special_token_markers_are_kept_in_the_text_the_parser_reads(tiny_base: Any) -> None:
    from tokenizers import AddedToken, Tokenizer

    from mintvcs.serve.http_chat import Llama3JsonFormat
    from mintvcs.serve.sampling import IncrementalDetokenizer

    plain = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    assert not HermesFormat().needs_special_tokens(plain)
    special = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    special.add_special_tokens([AddedToken("<tool_call>", special=True)])
    assert HermesFormat().needs_special_tokens(special)
    assert not Llama3JsonFormat().needs_special_tokens(special)
    ids = special.encode('<tool_call>{"name": "f"}', add_special_tokens=False).ids
    # Output text leaves special tokens out, so a Hermes call written with them was lost.
    kept = IncrementalDetokenizer(special, skip_special_tokens=False)
    dropped = IncrementalDetokenizer(special)
    for token in ids:
        kept.add(token)
        dropped.add(token)
    assert kept.flush().startswith("<tool_call>") and not dropped.flush().startswith("<tool_call>")


def test_a_forced_call_of_a_tool_without_parameters_is_an_object() -> None:
    """A tool that declares no parameters is still called with a JSON object of arguments."""
    plan = parse_tools(
        {
            "tools": [{"type": "function", "function": {"name": "now"}}],
            "tool_choice": {"type": "function", "function": {"name": "now"}},
        }
    )
    assert plan is not None
    spec = plan.structured()
    assert spec is not None and json.loads(spec.spec)["type"] == "object"


def test_up_to_max_tools_are_taken() -> None:
    """docs/http.md's limit: MAX_TOOLS tools are taken, one more is a 400."""
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]
    assert len(offered_tools({"tools": tools[:MAX_TOOLS]})) == MAX_TOOLS
    with pytest.raises(HTTPError, match="at most"):
        offered_tools({"tools": tools})


def test_a_tool_with_an_empty_name_is_refused() -> None:
    """A function named "" cannot be called by name: the request is a 400."""
    with pytest.raises(HTTPError, match=r"tools\[1\]"):
        offered_tools({"tools": [DICE, {"type": "function", "function": {"name": ""}}]})
