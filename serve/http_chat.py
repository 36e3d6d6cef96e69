"""Chat requests: messages checked and rendered into a prompt (the base's chat template, or the
plain one), and tool calls: `tools` offered to the template, `tool_choice` "required" or a named
function enforced as a structured output whose text becomes the reply's `tool_calls`."""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jinja2 import nodes
from jinja2.ext import Extension

from mintvcs.serve.app import HTTPError, field_of
from mintvcs.serve.sampling import StructuredOutput

# The template used when the base has no chat_template: one "role: content" line per message, then the
# assistant's turn. Documented in docs/http.md.
PLAIN_CHAT_SEPARATOR = "\n"
MAX_TOOLS = 128
# Hermes' (and Qwen2.5's) calls: <tool_call>{"name": ..., "arguments": {...}}</tool_call>.
HERMES_OPEN = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
# Llama 3.1-3.3's: the whole reply is one or more {"name": ..., "parameters": {...}} objects
# separated by ";", after the <|python_tag|> token where the detokenizer keeps it.
LLAMA3_PYTHON_TAG = "<|python_tag|>"
_ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(message: dict[str, Any], index: int) -> str:
    """A message's text: a string, or OpenAI's text parts joined (images and audio are refused)."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise HTTPError(
                    400, f"messages[{index}]: only text content parts are supported", "messages"
                )
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and message.get("role") == "assistant":
        content = ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise HTTPError(
            400, f"messages[{index}].content must be a string or text parts", "messages"
        )
    return content


def chat_message(message: Any, index: int) -> dict[str, Any]:
    """One checked message as chat templates read it: role, content, and an assistant's
    `tool_calls` (arguments parsed into objects, as templates expect) or a tool reply's
    `tool_call_id` and `name`."""
    if not isinstance(message, dict):
        raise HTTPError(
            400, f"messages[{index}] must be an object with role and content", "messages"
        )
    role = message.get("role")
    if role is None:
        raise HTTPError(400, f"messages[{index}].role is missing", "messages")
    if role not in _ROLES:
        raise HTTPError(
            400,
            f"messages[{index}].role {role!r:.40} is not {', '.join(_ROLES[:-1])} or tool",
            "messages",
        )
    out: dict[str, Any] = {"role": role, "content": _content(message, index)}
    calls = message.get("tool_calls")
    if role == "assistant" and calls is not None:
        out["tool_calls"] = [_past_call(call, index) for call in _list(calls, index)]
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                out[key] = message[key]
    return out


def _list(value: Any, index: int) -> list[Any]:
    if not isinstance(value, list):
        raise HTTPError(400, f"messages[{index}].tool_calls must be a list", "messages")
    return value


def _past_call(call: Any, index: int) -> dict[str, Any]:
    """An earlier tool call of the conversation, with its arguments as an object where they parse."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise HTTPError(
            400,
            f"messages[{index}].tool_calls: each needs function.name and function.arguments",
            "messages",
        )
    arguments: Any = function.get("arguments", "{}")
    if isinstance(arguments, str):
        # Else (not JSON, or nested past the parser's depth) a template gets the text as sent.
        with contextlib.suppress(ValueError, RecursionError):
            arguments = json.loads(arguments)
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def render_chat(
    messages: list[dict[str, Any]],
    tokenizer_config: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> tuple[str, bool]:
    """The prompt for a conversation, and whether the tokenizer's Jinja chat_template wrote it
    (else the plain template). As transformers' apply_chat_template: `add_generation_prompt`
    opens the assistant's turn; `continue_final_message` leaves the last message open, so that
    the reply continues it; `template_kwargs` are extra template variables (`enable_thinking`)."""
    if continue_final_message and (add_generation_prompt or not messages):
        raise HTTPError(
            400,
            "continue_final_message continues the last message: send it with "
            "add_generation_prompt false, after at least one message",
            "continue_final_message",
        )
    template = tokenizer_config.get("chat_template")
    if isinstance(
        template, list
    ):  # several named templates: take "tool_use" for tools, else "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = (tools and named.get("tool_use")) or named.get("default")
        if not template:
            # transformers refuses it too: a template picked by guess would write a prompt
            # the model was not trained on.
            wanted = '"tool_use" or "default"' if tools else '"default"'
            names = sorted(str(name) for name in named)
            raise HTTPError(
                400,
                f"the base model has several chat templates and none named {wanted} for this "
                f"request (available template names are {names}); its checkpoint needs a "
                "chat_template.jinja, the default one",
                "chat_template",
            )
    if isinstance(template, str) and template:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise HTTPError(
                400, f"the chat template refused the conversation: {message}", "chat_template"
            )

        # As transformers renders chat templates: loop controls, and a tojson that keeps key
        # order and writes non-ASCII and <>&' as they are (Jinja's own escapes them for HTML).
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=["jinja2.ext.loopcontrols", _GenerationBlock],
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))
        env.filters["tojson"] = _tojson

        def token(name: str) -> str:
            value = tokenizer_config.get(name)
            if isinstance(value, dict):  # AddedToken form
                value = value.get("content")
            return value if isinstance(value, str) else ""

        # The final message is rendered with a marker after its content, and the prompt is cut
        # at the marker, as transformers cuts it: neither a search for the content's text
        # (which may also stand in the end-of-turn markup, "end" in <|im_end|>) nor a guess at
        # who wrote the whitespace after it. Random, so no message holds it; a space after it,
        # to tell a template that writes the content as sent from one that trims it.
        marker = f"MINTCONTINUE{secrets.token_hex(8)}"
        final = ""
        if continue_final_message:
            content = messages[-1].get("content")
            if not isinstance(content, str):
                raise HTTPError(
                    400,
                    "continue_final_message: the last message has no text content to continue",
                    "continue_final_message",
                )
            final = content
            messages = [*messages[:-1], {**messages[-1], "content": final + marker + " "}]
        try:
            rendered = env.from_string(template).render(
                **(template_kwargs or {}),
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=token("bos_token"),
                eos_token=token("eos_token"),
            )
        except HTTPError:
            raise
        except (TemplateError, TypeError, ValueError, AttributeError, KeyError) as err:
            # A template is the checkpoint's code run on the client's messages: whatever it
            # raises on them is a refusal of the conversation, not a server error.
            raise HTTPError(
                400, f"the base model's chat template failed: {err}", "chat_template"
            ) from None
        if continue_final_message:
            at = rendered.rfind(marker)
            if at == -1 or final.strip() not in rendered:
                raise HTTPError(
                    400,
                    "continue_final_message: the chat template did not write the last message's "
                    "content as it was sent, so it cannot be continued",
                    "continue_final_message",
                )
            # A template that wrote the content as sent wrote its trailing whitespace too, and
            # transformers keeps it ("The answer is " goes on after the space); one that
            # trimmed it gets none back, whatever the template wrote after it.
            kept = rendered.startswith(marker + " ", at)
            rendered = rendered[:at] if kept else rendered[:at].rstrip()
        return rendered, True
    # Non-ASCII as it is, as templates' tojson writes it: escapes would cost tokens.
    lines = [f"tools: {_tojson(tools)}"] if tools else []
    for m in messages:
        content = m["content"]
        if m.get("tool_calls"):
            calls = [c["function"] for c in m["tool_calls"]]
            content = f"{content}{' ' if content else ''}tool_calls: {_tojson(calls)}"
        lines.append(f"{m['role']}: {content}")
    opened = ["assistant:"] if add_generation_prompt else []
    return PLAIN_CHAT_SEPARATOR.join([*lines, *opened]), False


class _GenerationBlock(Extension):
    """transformers' `{% generation %}...{% endgeneration %}`: marks the assistant's part for
    training masks; rendering a prompt keeps its body as it is."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads it from the class)

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Jinja's tojson as transformers defines it for chat templates: plain json.dumps."""
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


# ---------------------------------------------------------------------------- tools
@dataclass(frozen=True)
class ToolPlan:
    """A chat request's tools and what it asks of them: "none" (offered only), "auto" (the model
    decides; its reply is read for calls), "required" (one or more calls) or a named function
    (exactly that call)."""

    tools: tuple[dict[str, Any], ...]  # OpenAI's {"type": "function", "function": {...}}
    choice: str  # "none" | "auto" | "required" | "function"
    name: str | None = None  # the named function
    parallel: bool = True  # parallel_tool_calls: several calls allowed ("auto", "required")
    format: ToolCallFormat | None = None  # how "auto" replies are read for calls

    def structured(self) -> StructuredOutput | None:
        """The structured output that makes the reply a valid call (None for "none").

        Compact JSON (no whitespace but after "," and ":"): arguments are read by programs, and a
        model free to write whitespace may write nothing else until max_tokens.
        """
        if self.choice == "function":
            return StructuredOutput.json_schema(self._parameters(self.name), compact=True)
        if self.choice in ("none", "auto"):
            return None
        # vLLM's form for "required": a list of {"name", "parameters"}, one schema per tool.
        call = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": t["function"]["name"]},
                        "parameters": self._parameters(t["function"]["name"]),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in self.tools
            ]
        }
        schema: dict[str, Any] = {"type": "array", "items": call, "minItems": 1}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput.json_schema(schema, compact=True)

    def _parameters(self, name: str | None) -> Any:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object", "properties": {}}
        raise AssertionError(name)  # parse_tools checked the name

    @property
    def calling(self) -> bool:
        """Whether the reply may hold tool calls."""
        return self.choice != "none"

    def split(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """A finished reply as (content, tool_calls in OpenAI's form with fresh ids); no calls
        when it holds none (a "none" plan, plain text under "auto", an output cut short)."""
        if self.choice == "function":
            return None, [_tool_call(self.name or "", text)]
        if self.choice == "auto":
            found = None if self.format is None else self.format.calls(text)
            if found is None:
                return text, None
            # The model cannot be held to one call here; as vLLM does, keep its first.
            return found if self.parallel else (found[0], found[1][:1])
        if self.choice == "required":
            try:
                items = json.loads(text)
            except ValueError:
                return text, None
            return None, [_tool_call(i["name"], _arguments(i["parameters"])) for i in items]
        return text, None


def _arguments(value: Any) -> str:
    """A call's arguments as JSON text, non-ASCII as it is."""
    return value if isinstance(value, str) else _tojson(value)


Calls = tuple[str | None, list[dict[str, Any]]]  # (content before the calls or None, calls)


class ToolCallFormat:
    """How a model writes tool calls into its reply, for tool_choice "auto" (--tool-call-parser)."""

    markers: tuple[str, ...] = ()  # the text it finds calls by; a checkpoint may make them special

    def needs_special_tokens(self, tokenizer: Any) -> bool:
        """Whether one of the markers is a special token of `tokenizer`, which output text
        leaves out unless the request keeps special tokens."""
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        return any(marker in special for marker in self.markers)

    def calls(self, text: str) -> Calls | None:
        """The content and calls of a finished reply; None when it holds no calls (it is text)."""
        raise NotImplementedError

    def streamable(self, text: str) -> int:
        """How much of an unfinished reply is certainly content, not the start of a call."""
        raise NotImplementedError


class HermesFormat(ToolCallFormat):
    """Hermes and Qwen2.5: text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    blocks."""

    markers = (HERMES_OPEN, "</tool_call>")

    def calls(self, text: str) -> Calls | None:
        """The content before the first <tool_call> and the calls (text after the last call is
        dropped, as vLLM's parser does); None when no call is complete or one does not parse."""
        start = text.find(HERMES_OPEN)
        if start == -1:
            return None
        calls = []
        blocks = list(_HERMES_CALL.finditer(text, start))
        if not blocks:  # an unclosed call: cut short
            return None
        for block in blocks:
            call = _call_object(block.group(1), "arguments")
            if call is None:
                return None
            calls.append(call)
        content = text[:start]
        return (content if content.strip() else None), calls

    def streamable(self, text: str) -> int:
        """Up to the first <tool_call>, or up to a tail that could still grow into one."""
        return before_possible(text, HERMES_OPEN)


class Llama3JsonFormat(ToolCallFormat):
    """Llama 3.1-3.3 (JSON tool calling): the reply is the calls and nothing else, each
    {"name": ..., "parameters": {...}} ("arguments" also read), separated by ";", after an
    optional <|python_tag|>."""

    markers = (LLAMA3_PYTHON_TAG,)

    def calls(self, text: str) -> Calls | None:
        """The calls of a reply made of calls only; None for anything else."""
        body = text.strip()
        body = body.removeprefix(LLAMA3_PYTHON_TAG)
        decoder = json.JSONDecoder()
        calls, at = [], 0
        while True:
            while at < len(body) and body[at].isspace():
                at += 1
            try:
                value, at = decoder.raw_decode(body, at)
            except ValueError:
                return None
            call = _call_value(value, "parameters")
            if call is None:
                return None
            calls.append(call)
            rest = body[at:].lstrip()
            if not rest:
                return None, calls
            if rest[0] != ";":
                return None  # text after a call: the reply is text
            if not rest[1:].strip():
                return None, calls  # a trailing separator
            at = len(body) - len(rest) + 1

    def streamable(self, text: str) -> int:
        """Nothing while the reply may still be calls (it starts with "{" or the python tag);
        all of it once it cannot."""
        head = text.lstrip()
        could_be_calls = (
            not head
            or head.startswith(("{", LLAMA3_PYTHON_TAG))
            or LLAMA3_PYTHON_TAG.startswith(head)
        )
        return 0 if could_be_calls else len(text)


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {
    "hermes": HermesFormat(),
    "llama3_json": Llama3JsonFormat(),
}


def before_possible(text: str, marker: str) -> int:
    """How much of `text` cannot be part of `marker`: up to its first occurrence, or up to a
    tail that could still grow into it."""
    at = text.find(marker)
    if at != -1:
        return at
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)


def _call_object(text: str, arguments_key: str) -> dict[str, Any] | None:
    """A call in OpenAI's form from its JSON text; None if it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return _call_value(value, arguments_key)


def _call_value(value: Any, arguments_key: str) -> dict[str, Any] | None:
    """A call in OpenAI's form from {"name": ..., arguments_key or the other: {...}}; None if
    it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    other = "parameters" if arguments_key == "arguments" else "arguments"
    arguments = value.get(arguments_key, value.get(other, {}))
    return _tool_call(value["name"], _arguments(arguments))


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def offered_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A request's `tools`, checked: OpenAI's function tools with unique names; 400 otherwise."""
    raw = field_of(body, "tools", (list,), [])
    if len(raw) > MAX_TOOLS:
        raise HTTPError(400, f"{len(raw)} tools; at most {MAX_TOOLS}", "tools")
    tools: list[dict[str, Any]] = []
    for i, tool in enumerate(raw):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise HTTPError(
                400,
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                "tools",
            )
        parameters = function.get("parameters")
        if parameters is not None and (
            not isinstance(parameters, dict) or parameters.get("type", "object") != "object"
        ):
            raise HTTPError(
                400,
                f"tools[{i}].function.parameters must be a JSON schema of an object "
                '({"type": "object", ...}): arguments are a JSON object',
                "tools",
            )
        tools.append({"type": "function", "function": function})
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise HTTPError(400, "tools: two tools have the same name", "tools")
    return tools


def parse_tools(body: dict[str, Any], parser: str | None = None) -> ToolPlan | None:
    """The tools and tool_choice of a chat request; 400 for malformed ones, and for "auto" (the
    default with tools) when the server reads no tool-call format (`parser`)."""
    tools = offered_tools(body)
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            raise HTTPError(400, "tool_choice needs a non-empty list of tools", "tool_choice")
        return None
    names = [t["function"]["name"] for t in tools]
    parallel = field_of(body, "parallel_tool_calls", (bool,), True)
    if choice is None or choice == "auto":
        if parser is None:
            raise HTTPError(
                400,
                'tool_choice "auto" (the default with tools) needs a parser of the model\'s own '
                "tool-call format: start the server with --tool-call-parser, or send "
                'tool_choice "required", {"type": "function", "function": {"name": ...}} or "none"',
                "tool_choice",
            )
        return ToolPlan(tuple(tools), "auto", parallel=parallel, format=TOOL_CALL_FORMATS[parser])
    if choice == "none":
        return ToolPlan(tuple(tools), choice, parallel=parallel)
    if body.get("stop") or body.get("stop_token_ids"):
        # A stop string inside the arguments would cut a call the reply must hold.
        raise HTTPError(
            400,
            "stop and stop_token_ids would cut short the call this tool_choice requires; "
            "leave them out",
            "tool_choice",
        )
    if choice == "required":
        return ToolPlan(tuple(tools), choice, parallel=parallel)
    named = (
        choice.get("function")
        if isinstance(choice, dict) and choice.get("type", "function") == "function"
        else None
    )
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise HTTPError(
            400,
            'tool_choice must be "none", "required", "auto" or {"type": "function", '
            '"function": {"name": ...}}',
            "tool_choice",
        )
    if name not in names:
        raise HTTPError(
            400, f"tool_choice names {name!r:.60}, which is not in tools", "tool_choice"
        )
    return ToolPlan(tuple(tools), "function", name, parallel)
