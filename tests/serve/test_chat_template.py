"""Chat templates rendered as transformers' apply_chat_template renders them, from wherever
transformers saves them, with the options vLLM's chat endpoint takes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mintvcs.serve.app import HTTPError, read_tokenizer_config
from mintvcs.serve.http_chat import chat_message, render_chat

# A ChatML-style template with what recent checkpoints use: a {% generation %} block,
# strftime_now, a kwarg (enable_thinking) and the end-of-turn after each message.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
    "{% endif %}today {{ strftime_now('%d %b %Y') }}"
)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "The answer is"},
]


@pytest.fixture(scope="module")
def base_with_jinja(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").write_text(TEMPLATE)  # where transformers saves it now
    return base


@pytest.mark.parametrize(
    "options",
    [
        {"add_generation_prompt": True, "messages": MESSAGES[:2]},
        {"add_generation_prompt": True, "messages": MESSAGES[:2], "enable_thinking": False},
        {"add_generation_prompt": False, "continue_final_message": True, "messages": MESSAGES},
    ],
)
def test_rendered_as_transformers_renders_it(
    base_with_jinja: Path, options: dict[str, Any]
) -> None:
    from transformers import AutoTokenizer

    options = dict(options)
    messages = options.pop("messages")
    expected = AutoTokenizer.from_pretrained(str(base_with_jinja)).apply_chat_template(
        messages, tokenize=False, **options
    )
    config = read_tokenizer_config(base_with_jinja)  # the template was ignored there
    kwargs = {k: options.pop(k) for k in list(options) if k == "enable_thinking"}
    rendered, templated = render_chat(messages, config, template_kwargs=kwargs, **options)
    assert templated and rendered == expected


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {}}}]


def _hf_render(base: Path, tools: list[dict[str, Any]] | None = None) -> str:
    from transformers import AutoTokenizer

    rendered = AutoTokenizer.from_pretrained(str(base)).apply_chat_template(
        MESSAGES[:2], tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    return rendered


def test_the_jinja_file_wins_over_the_config_and_named_templates_are_read(
    tiny_base: Path, tmp_path: Path
) -> None:
    """transformers: independent template files take priority over the config's entry, and
    additional_chat_templates/tool_use.jinja is the template when tools are sent."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["chat_template"] = "OLD{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").write_text(TEMPLATE)
    expected = _hf_render(base)
    assert expected.startswith("<s><|im_start|>system")  # the .jinja file, not OLD
    assert render_chat(MESSAGES[:2], read_tokenizer_config(base))[0] == expected
    (base / "additional_chat_templates").mkdir()
    tool_use = "TOOLS {{ tools | length }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    (base / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    for tools in (None, TOOLS):
        expected = _hf_render(base, tools)
        assert render_chat(MESSAGES[:2], read_tokenizer_config(base), tools)[0] == expected
    assert expected.startswith("TOOLS 1|")


@pytest.mark.parametrize("where", ["config", "files"])
def test_named_templates_without_a_default_refuse_a_chat_as_transformers_does(
    tiny_base: Path, tmp_path: Path, where: str
) -> None:
    """Named templates with none called "default": transformers refuses a chat without tools,
    naming the templates there are, where a list in the config rendered the plain template
    and the config's own template stood in for the default beside named files."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    tool_use = "TOOLS {{ tools | length }}{% for m in messages %}|{{ m.content }}{% endfor %}"
    if where == "config":
        config["chat_template"] = [{"name": "tool_use", "template": tool_use}]
    else:  # transformers keeps the files only: the config's template is not the default
        config["chat_template"] = "OLD{% for m in messages %}{{ m.content }}{% endfor %}"
        (base / "additional_chat_templates").mkdir()
        (base / "additional_chat_templates" / "tool_use.jinja").write_text(tool_use)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"no default specified.*\['tool_use'\]"):
        _hf_render(base)
    with pytest.raises(HTTPError) as refused:
        render_chat(MESSAGES[:2], read_tokenizer_config(base))
    assert refused.value.status == 400 and "['tool_use']" in str(refused.value), refused.value
    assert '"default"' in str(refused.value)
    expected = _hf_render(base, TOOLS)
    assert expected.startswith("TOOLS 1|")
    assert render_chat(MESSAGES[:2], read_tokenizer_config(base), TOOLS) == (expected, True)


def test_special_tokens_from_special_tokens_map(tiny_base: Path, tmp_path: Path) -> None:
    """An older save keeps bos/eos in special_tokens_map.json only: transformers reads them
    there (for a config without added_tokens_decoder), so {{ bos_token }} is not empty."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    config = json.loads((base / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token", "added_tokens_decoder"):
        config.pop(key, None)
    config["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}{{ eos_token }}"
    )
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>", "lstrip": False}})
    )
    expected = _hf_render(base)
    assert expected.startswith("<s>[INST]") and expected.endswith("</s>")
    assert render_chat(MESSAGES[:2], read_tokenizer_config(base))[0] == expected


def test_continuing_needs_no_generation_prompt(base_with_jinja: Path) -> None:
    config = read_tokenizer_config(base_with_jinja)
    with pytest.raises(HTTPError, match="add_generation_prompt false"):
        render_chat(MESSAGES, config, continue_final_message=True)


def test_continuing_cuts_after_the_last_copy_of_the_final_message(base_with_jinja: Path) -> None:
    """A final message whose text came earlier too is continued where it is, not at the first copy."""
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    expected = AutoTokenizer.from_pretrained(str(base_with_jinja)).apply_chat_template(
        messages, tokenize=False, **options
    )
    assert expected.endswith("<|im_start|>assistant\nHi")
    config = read_tokenizer_config(base_with_jinja)
    assert render_chat(messages, config, **options) == (expected, True)


def test_tools_take_the_tool_use_template_of_named_ones() -> None:
    """Of a list of named templates, a request with tools gets "tool_use", one without "default"."""
    config = {
        "chat_template": [
            {"name": "default", "template": "plain"},
            {"name": "tool_use", "template": "{{ tools[0].function.name }}"},
        ]
    }
    messages = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "roll"}}
    assert render_chat(messages, config, [tool]) == ("roll", True)
    assert render_chat(messages, config) == ("plain", True)


def test_the_developer_role_reaches_the_template() -> None:
    """OpenAI's developer role (docs/http.md) is taken and reaches the template as it is."""
    message = chat_message({"role": "developer", "content": "Be brief."}, 0)
    assert message == {"role": "developer", "content": "Be brief."}
    config = {"chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"}
    assert render_chat([message], config) == ("[developer]Be brief.", True)


def test_only_text_content_parts_are_taken() -> None:
    """A content part of another type is refused even when it carries a text key."""
    text = {"type": "text", "text": "look: "}
    image = {"type": "image_url", "text": "x", "image_url": {"url": "data:,"}}
    assert chat_message({"role": "user", "content": [text, text]}, 0)["content"] == "look: look: "
    with pytest.raises(HTTPError, match="only text content parts"):
        chat_message({"role": "user", "content": [text, image]}, 0)


def test_a_tool_reply_keeps_its_call_id_and_name() -> None:
    """A tool message's tool_call_id and name reach the template (Mistral's checks the id)."""
    reply = {"role": "tool", "content": "cold", "tool_call_id": "c1", "name": "get_weather"}
    assert chat_message(reply, 2) == reply


@pytest.mark.parametrize(
    "final",
    ["The answer is ", " x\n", "Hi", "Hi ", "Hi\n", "Hi\n\n", "Sure:\n", "end", "m", "id", ""],
)
@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}",
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</s>{% endfor %}",
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\n</s>{% endfor %}",
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content | trim }} [/INST]"
        "{% else %}{{ ' ' + m.content | trim + ' ' + '</s>' }}{% endif %}{% endfor %}",
        "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
        "{{ m.content | trim }}<|eot_id|>{% endfor %}",
    ],
    ids=["as-sent", "trimmed", "trimmed-then-newline", "chatml", "llama2", "llama3"],
)
def test_continuing_keeps_the_final_whitespace_the_template_wrote(
    template: str, final: str
) -> None:
    """The continued message ends as transformers ends it: with its trailing whitespace where the
    template wrote the content as sent, without where the template trimmed it, even when the
    template writes whitespace of its own after it; and cut at the message, not at a copy of its
    text in the end-of-turn markup ("end" in <|im_end|>)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": final}]
    expected = render_jinja_template(
        conversations=[messages], chat_template=template, continue_final_message=True
    )[0][0]
    rendered = render_chat(
        messages,
        {"chat_template": template},
        add_generation_prompt=False,
        continue_final_message=True,
    )
    assert rendered == (expected, True)
