"""Generation endpoints: `POST /generate`, OpenAI-compatible `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, and their server-sent-event streams.

Every generation request resolves its ref once, at admission, through the ref watcher; the commit id
it got is the revision the whole request runs on (reported in the body and in `X-Mint-Revision`).
The first token (or the engine's refusal) is awaited before the response starts, so that a refused
revision is still a clean 422 even for a streaming request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web

from mintvcs.errors import MintError
from mintvcs.refs import InvalidRefNameError
from mintvcs.serve.app import (
    BASE_LABEL,
    REF_KEY,
    STARTED_KEY,
    STATE,
    STATUS_KEY,
    HTTPError,
    ServerState,
    count_tokens,
    drop_slow_client,
    error_body,
    expect_body,
    field_of,
    read_json,
    sent,
    status_for,
)
from mintvcs.serve.http_chat import (
    chat_message,
    offered_tools,
    parse_tools,
    render_chat,
)
from mintvcs.serve.refwatch import Resolution, check_spec
from mintvcs.serve.sampling import (
    MAX_LOGPROBS,
    IncrementalDetokenizer,
    SamplingParams,
    StructuredOutput,
    TokenLogprobs,
    incomplete_tail,
    special_ids,
    texts_after_a_word,
)
from mintvcs.serve.scheduler import TokenEvent
from mintvcs.serve.structured import compile_pool

if TYPE_CHECKING:
    from mintvcs.serve.engine import Engine

log = logging.getLogger("mintvcs.serve")

REVISION_HEADER = "X-Mint-Revision"
MAX_STOP_STRINGS = 16
# Prompts x n per OpenAI request: every choice is its own sequence, queued like a request of
# its own (the body size limit bounds the prompts too).
MAX_CHOICES = 1024
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries
# Prompt log-probabilities (alternatives included) one answer may hold, an echo's and
# prompt_logprobs' together: ~20 MB of JSON.
MAX_PROMPT_LOGPROBS = 1 << 20
MAX_MODELS_LIMIT = 10_000  # refs one /v1/models answer lists (read on a worker thread)
_TOKEN_KEY = re.compile(r"[0-9]{1,9}")


# ---------------------------------------------------------------------------- parsing
def sampling_params(
    body: dict[str, Any],
    state: ServerState,
    *,
    default_temperature: float = 1.0,
    to_context_end: bool = False,
) -> SamplingParams:
    """SamplingParams from a request body; 400 on wrong types, non-finite or out-of-range values.

    Without max_tokens, a completion gets the server's default; with `to_context_end` (chat, as
    OpenAI does) it runs to the end of the context, or to the server's limit if that comes first,
    or to generation_config.json's max_new_tokens (as vLLM's chat) if that comes first.
    """
    limit = state.config.max_tokens_limit
    given = state.sampling_defaults
    default = state.config.default_max_tokens
    if to_context_end:
        default = min(limit, int(given.get("max_tokens", limit)))
    max_tokens = field_of(body, "max_tokens", (int,), default)
    # OpenAI's newer name wins over the deprecated one when a client sends both.
    named = (
        "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = field_of(body, "max_completion_tokens", (int,), max_tokens)
    if max_tokens < 1 or max_tokens > limit:
        raise HTTPError(400, f"{named} must be in [1, {limit}], got {max_tokens}", named)
    # A field the request leaves out takes the model's default (generation_config.json, as vLLM).
    temperature = field_of(
        body, "temperature", (float,), given.get("temperature", default_temperature)
    )
    top_p = field_of(body, "top_p", (float,), given.get("top_p", 1.0))
    top_k = field_of(body, "top_k", (int,), int(given.get("top_k", 0)))
    seed = field_of(body, "seed", (int,), None)
    stop_raw = field_of(body, "stop", (str, list), [])
    stop = [stop_raw] if isinstance(stop_raw, str) else stop_raw
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise HTTPError(
            400,
            f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them",
            "stop",
        )
    ignore_eos = field_of(body, "ignore_eos", (bool,), False)  # vLLM's extension, for benchmarks
    # SamplingParams checks the ranges and raises InvalidSamplingParams (400) naming the value.
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=tuple(stop),
        ignore_eos=ignore_eos,
        presence_penalty=field_of(body, "presence_penalty", (float,), 0.0),
        frequency_penalty=field_of(body, "frequency_penalty", (float,), 0.0),
        repetition_penalty=field_of(
            body, "repetition_penalty", (float,), given.get("repetition_penalty", 1.0)
        ),
        min_tokens=field_of(body, "min_tokens", (int,), 0),
        min_p=field_of(body, "min_p", (float,), given.get("min_p", 0.0)),
        stop_token_ids=_token_ids(body, "stop_token_ids", MAX_STOP_STRINGS),
        logit_bias=_logit_bias(body),
        allowed_token_ids=_allowed_token_ids(body),
        cache_salt=field_of(body, "cache_salt", (str,), None),
        structured=structured_output(body),
    )


def as_token_ids(value: Any) -> list[int] | None:
    """`value` as a list of token ids, or None if it is not one: integers, or whole-number floats
    as integer fields take them (pydantic's lax mode, as vLLM reads lists of ids too)."""
    if not isinstance(value, list):
        return None
    ids = []
    for t in value:
        if isinstance(t, bool) or not (
            isinstance(t, int) or (isinstance(t, float) and t.is_integer())
        ):
            return None
        ids.append(int(t))
    return ids


def _token_ids(body: dict[str, Any], name: str, limit: int) -> tuple[int, ...]:
    """A list of at most `limit` token ids; 400 otherwise (the engine checks them against the vocabulary)."""
    ids = as_token_ids(field_of(body, name, (list,), []))
    if ids is None or len(ids) > limit:
        raise HTTPError(400, f"{name} must be a list of at most {limit} token ids", name)
    return tuple(ids)


def _allowed_token_ids(body: dict[str, Any]) -> tuple[int, ...] | None:
    """vLLM's allowed_token_ids: a non-empty list of token ids, or None (every token allowed)."""
    value = field_of(body, "allowed_token_ids", (list,), None)
    if value is None:
        return None
    ids = as_token_ids(value)
    if not ids:
        raise HTTPError(
            400, "allowed_token_ids must be a non-empty list of token ids", "allowed_token_ids"
        )
    return tuple(ids)


def _logit_bias(body: dict[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: {"token id": bias}; 400 for a key that is not a token id or a bias that is not a number."""
    value = field_of(body, "logit_bias", (dict,), {})
    if len(value) > MAX_LOGIT_BIAS:
        raise HTTPError(
            400, f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS}", "logit_bias"
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        # ASCII digits only: str.isdigit() takes superscripts and other scripts' digits, and
        # int() of a 5000-digit key raises.
        number = (
            isinstance(bias, (int, float))
            and not isinstance(bias, bool)
            and -1e9 < bias < 1e9  # NaN and infinities fail; 10**400 compares without overflowing
        )
        if not (isinstance(key, str) and _TOKEN_KEY.fullmatch(key)) or not number:
            raise HTTPError(
                400,
                f"logit_bias maps token ids to numbers; got {key!r:.40}: {bias!r:.40}",
                "logit_bias",
            )
        if int(key) in out:  # "5" and "05": one token, two biases that would add up
            raise HTTPError(400, f"logit_bias names token {int(key)} twice", "logit_bias")
        out[int(key)] = float(bias)
    return tuple(out.items())


# OpenAI (and vLLM) request fields that change what is generated, with the values that change
# nothing: anything else is refused, since ignoring it would silently return other text.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "suffix": ("",),
    "functions": ([],),  # OpenAI's deprecated form of tools
    # vLLM's: a request's own template is not run; special tokens are always left out of the
    # text; a stop string never ends up in it.
    "chat_template": (),
    "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
    # vLLM's sampling extensions this server does not implement: beam search (and its length
    # penalty), banned words, prompt truncation, ids in place of logprobs' token texts,
    # server-side logits processors and their extension arguments.
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "bad_words": ([],),
    "truncate_prompt_tokens": (),
    "return_tokens_as_token_ids": (False,),
    "logits_processors": ([],),
    "vllm_xargs": ({},),
    # vLLM's structured output by structural tags; documents a RAG chat template would render;
    # a prompt given as embeddings.
    "structural_tag": (),
    "documents": ([],),
    "prompt_embeds": (),
}

# vLLM's structured_outputs keys (and its older guided_* fields) -> our kinds.
_STRUCTURED_KEYS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED_FIELDS = {f"guided_{key}": kind for key, kind in _STRUCTURED_KEYS.items()}
# structured_outputs keys that change nothing here: which library enforces it, and vLLM's
# fallback between libraries (llguidance always does).
_STRUCTURED_IGNORED = ("backend", "disable_fallback")


def structured_output(body: dict[str, Any]) -> StructuredOutput | None:
    """The structured output a request asks for, by OpenAI's response_format, vLLM's
    structured_outputs or its older guided_* fields (one of them; structured_outputs may also
    carry only options for response_format's schema); 400 when malformed."""
    options = field_of(body, "structured_outputs", (dict,), None)
    kinds = [] if options is None else _structured_kinds(options)
    given = [name for name in _GUIDED_FIELDS if body.get(name) is not None]
    if body.get("response_format") is not None:
        given.append("response_format")
    if kinds:
        given.append("structured_outputs")
    if len(given) > 1:
        raise HTTPError(
            400, f"give one of {' and '.join(given)}, not several", "structured_outputs"
        )
    if body.get("guided_whitespace_pattern") is not None:
        raise HTTPError(
            400,
            "guided_whitespace_pattern is not supported; structured_outputs."
            "disable_any_whitespace allows none but after ',' and ':'",
            "unsupported",
        )
    compact = False
    if options is not None:
        compact = field_of(options, "disable_any_whitespace", (bool,), False)
        if not given:
            raise HTTPError(
                400,
                "structured_outputs needs exactly one of json, regex, choice, grammar or "
                "json_object (or response_format beside it)",
                "structured_outputs",
            )
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        return _response_format(field_of(body, name, (dict,)), compact)
    if name == "structured_outputs":
        assert options is not None
        if kinds[0] == "json_object":
            return StructuredOutput.json_schema({"type": "object"}, compact=compact)
        return _structured(_STRUCTURED_KEYS[kinds[0]], options[kinds[0]], name, compact)
    return _structured(_GUIDED_FIELDS[name], body[name], name, compact)


def _structured_kinds(options: dict[str, Any]) -> list[str]:
    """Which kind a structured_outputs object asks for (none, when it only sets options); 400
    for several, and for a key this server would otherwise ignore."""
    known = {*_STRUCTURED_KEYS, "json_object", "disable_any_whitespace", *_STRUCTURED_IGNORED}
    unknown = sorted(key for key, value in options.items() if key not in known and value)
    if unknown:
        raise HTTPError(
            400,
            f"structured_outputs.{unknown[0]} is not supported; leave it out",
            "unsupported",
        )
    kinds = [key for key in _STRUCTURED_KEYS if options.get(key) is not None]
    if options.get("json_object") is True:
        kinds.append("json_object")
    if len(kinds) > 1:
        raise HTTPError(
            400,
            "structured_outputs needs exactly one of json, regex, choice, grammar or "
            f"json_object, got {', '.join(kinds)}",
            "structured_outputs",
        )
    return kinds


def _schema(value: Any, name: str, compact: bool) -> StructuredOutput:
    """A JSON-schema structured output; `true` (anything) is `{}`, `false` admits no output."""
    if value is True:
        value = {}
    if value is False:
        raise HTTPError(400, f"{name}: the schema false admits no output at all", name)
    if not isinstance(value, dict):
        raise HTTPError(400, f"{name} must be a JSON schema (an object)", name)
    return StructuredOutput.json_schema(value, compact=compact)


def _structured(kind: str, value: Any, name: str, compact: bool) -> StructuredOutput:
    """One structured output from a field's value: a schema (object, bool or JSON text), a string or a list of strings."""
    if kind == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except (ValueError, RecursionError) as err:  # RecursionError: nested too deeply
                raise HTTPError(400, f"{name}: the JSON schema is not JSON: {err}", name) from None
        return _schema(value, name, compact)
    if kind == "choice":
        if not isinstance(value, list):
            raise HTTPError(400, f"{name} must be a list of strings", name)
        return StructuredOutput.choice(value)
    if not isinstance(value, str):
        raise HTTPError(400, f"{name} must be a string", name)
    return StructuredOutput(kind, value)


def _response_format(value: dict[str, Any], compact: bool) -> StructuredOutput | None:
    """OpenAI's response_format: text (nothing to enforce), json_object, or json_schema."""
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput.json_schema({"type": "object"}, compact=compact)
    if kind == "json_schema":
        named = field_of(value, "json_schema", (dict,))
        if "schema" not in named:
            raise HTTPError(
                400,
                "response_format.json_schema.schema must be a JSON schema (an object)",
                "response_format",
            )
        return _schema(named["schema"], "response_format.json_schema.schema", compact)
    raise HTTPError(
        400,
        f"response_format type must be text, json_object or json_schema, got {kind!r:.40}",
        "response_format",
    )


def _render_conversation(
    state: ServerState,
    body: dict[str, Any],
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
) -> tuple[str, bool]:
    """render_chat with the request's template options (vLLM's and transformers' names)."""
    kwargs = field_of(body, "chat_template_kwargs", (dict,), {})
    return render_chat(
        messages,
        state.tokenizer_config,
        tools,
        add_generation_prompt=field_of(body, "add_generation_prompt", (bool,), True),
        continue_final_message=field_of(body, "continue_final_message", (bool,), False),
        template_kwargs={k: v for k, v in kwargs.items() if k not in _TEMPLATE_OWN},
    )


# Variables the server gives a chat template itself: chat_template_kwargs cannot replace them.
_TEMPLATE_OWN = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


# Tools are for chat only; chat has no echo of the last message (vLLM's).
_COMPLETIONS_NEUTRAL = {**_NEUTRAL, "tools": ([],), "tool_choice": ("none",)}
_CHAT_NEUTRAL = {**_NEUTRAL, "echo": (False,)}
# What /generate does not take of /v1/completions besides: one choice, no echo, no prompt
# logprobs (the /v1 routes give them in vLLM's form).
_GENERATE_NEUTRAL = {
    **_COMPLETIONS_NEUTRAL,
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "prompt_logprobs": (),
}


def _refuse_unsupported(body: dict[str, Any], *, chat: bool = False) -> None:
    """400 for an OpenAI field this server does not implement, unless its value is the neutral one."""
    _refuse_fields(body, _CHAT_NEUTRAL if chat else _COMPLETIONS_NEUTRAL, "this server")


def _refuse_generate_fields(body: dict[str, Any]) -> None:
    """400 for what /generate would otherwise ignore: `model` (an OpenAI client's habit, which
    would answer from `ref`'s revision instead) and /v1/completions' fields it does not take."""
    if "model" in body:
        raise HTTPError(
            400,
            "/generate names the revision in 'ref', not 'model' ('model' is for the /v1 endpoints)",
            "unsupported",
        )
    _refuse_fields(body, _GENERATE_NEUTRAL, "/generate")


def _refuse_fields(body: dict[str, Any], fields: dict[str, tuple[object, ...]], where: str) -> None:
    """400 naming the first of `fields` that `body` holds with a value not among its neutral ones."""
    for name, neutral in fields.items():
        value = body.get(name)
        # 0.0 counts as 0, but True is not 1: JSON's booleans and numbers are different values.
        if value is None or any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral
        ):
            continue
        shown = repr(value)
        raise HTTPError(
            400,
            f"{name} is not supported by {where}; leave it out"
            + (f" (got {shown})" if len(shown) <= 60 else ""),
            "unsupported",
        )


@dataclass
class Admitted:
    """A request that passed validation, resolved its ref, and got its first event."""

    spec: str
    label: str  # the metrics label: the branch or tag it went through (ServerState.ref_label)
    resolution: Resolution | None  # None: the base alone (the served base name)
    stream: Any  # RequestStream
    first: TokenEvent
    prompt_ids: list[int]

    @property
    def revision(self) -> str | None:
        """The commit the request runs on; None for the base alone."""
        return None if self.resolution is None else self.resolution.commit

    @property
    def resolved_ref(self) -> str | None:
        """The full ref name the spec went through (None for a commit id or the base)."""
        return None if self.resolution is None else self.resolution.ref

    @property
    def prompt_tokens(self) -> int:
        """How many tokens the prompt has."""
        return len(self.prompt_ids)


Prompt = str | list[int]  # text, or token ids sent as they are


def _prompt_ids(state: ServerState, prompt: Prompt, special_tokens: bool) -> list[int]:
    """A prompt's token ids; 400 for an empty or malformed prompt, 413 for one too large."""
    engine = state.require_engine()
    if isinstance(prompt, list):
        given = as_token_ids(prompt)
        if not given:
            raise HTTPError(400, "a token-id prompt must be a non-empty list of integers", "prompt")
        ids = given
    else:
        if not isinstance(prompt, str) or not prompt:
            raise HTTPError(400, "prompt must be a non-empty string", "prompt")
        _check_prompt_bytes(state, prompt)
        ids = engine.encode(prompt, special_tokens=special_tokens)
    if len(ids) >= engine.max_model_len:
        raise HTTPError(
            413,
            f"the prompt is {len(ids)} tokens; the model context is {engine.max_model_len}",
            "prompt_too_long",
        )
    return ids


def _check_prompt_bytes(state: ServerState, text: str) -> None:
    """413 for a prompt over --max-prompt-bytes."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > state.config.max_prompt_bytes:
        raise HTTPError(
            413,
            f"the prompt is {size} bytes; this server takes at most {state.config.max_prompt_bytes}",
            "prompt_too_large",
        )


async def admit_many(
    request: web.Request,
    requests: list[tuple[Prompt, SamplingParams]],
    spec: object,
    *,
    stream: bool,
    special_tokens: bool = True,
) -> list[Admitted]:
    """Check sizes, resolve the ref once, submit all (or none), and await each first event (errors become 4xx).

    Without `stream`, the tokens after the first reach this loop together when each request ends.
    `special_tokens=False` encodes text prompts as they are (a chat template writes its own BOS).
    """
    state = request.app[STATE]
    engine = state.require_engine()
    name = check_spec(spec)
    resolution: Resolution | None = None
    label = BASE_LABEL
    # The base's own name wins over a ref of that name. A ref is resolved first: one that
    # names nothing costs no encoding.
    if name != state.config.base_name:
        # A spec not cached may walk a long history (`main~20000`, a reflog): not on the loop.
        resolution = state.watcher.cached(name)
        if resolution is None:
            resolution = await asyncio.to_thread(state.watcher.resolve, name)
        label = state.ref_label(resolution.ref, resolution.spec)
    request[REF_KEY] = label
    # Each distinct prompt is encoded once (n choices repeat one prompt object), on a worker
    # thread when the text is large: encoding 64 KiB takes ~75 ms the loop would stand still.
    distinct = list({id(prompt): prompt for prompt, _ in requests}.values())

    def encode_all() -> dict[int, list[int]]:
        return {id(p): _prompt_ids(state, p, special_tokens) for p in distinct}

    text_bytes = sum(len(p) for p in distinct if isinstance(p, str))
    encoded = await asyncio.to_thread(encode_all) if text_bytes > 16_384 else encode_all()
    ids = [encoded[id(prompt)] for prompt, _ in requests]
    compiled = {}
    for spec in {params.structured for _, params in requests if params.structured is not None}:
        # A cached one at once; else on the compile pool (not the loop's default executor):
        # the first one builds the tokenizer's index, and a large schema can take seconds to
        # compile. Submitting then copies what was compiled here.
        known = engine.cached_grammar(spec)
        if known is None:
            known = await asyncio.wrap_future(compile_pool().submit(_compile, engine, spec))
        compiled[spec] = known
    submitted = engine.submit_many(
        [
            (i, None if resolution is None else resolution.commit, params)
            for i, (_, params) in zip(ids, requests, strict=True)
        ],
        stream=stream,
        compiled=compiled,
        max_unread=state.config.max_stream_backlog,
        on_overflow=partial(
            drop_slow_client,
            request,
            f"fell more than {state.config.max_stream_backlog} events behind "
            "(--max-stream-backlog)",
        ),
    )
    firsts: list[TokenEvent] = []
    try:
        for one in submitted:
            firsts.append(await one.__anext__())
    except BaseException:
        for one in submitted:
            one.cancel()
        raise
    count_tokens(request, label, "prompt", sum(len(i) for i in encoded.values()))
    state.first_token_latency.observe(time.monotonic() - request[STARTED_KEY])
    return [
        Admitted(name, label, resolution, one, first, i)
        for one, first, i in zip(submitted, firsts, ids, strict=True)
    ]


def _compile(engine: Engine, spec: StructuredOutput) -> Any:
    return engine.grammars().compile(spec)


async def admit(
    request: web.Request,
    prompt: Prompt,
    spec: object,
    params: SamplingParams,
    *,
    stream: bool,
    special_tokens: bool = True,
) -> Admitted:
    """admit_many() for one request."""
    admitted = await admit_many(
        request, [(prompt, params)], spec, stream=stream, special_tokens=special_tokens
    )
    return admitted[0]


async def events(admitted: Admitted) -> AsyncIterator[TokenEvent]:
    """The first event, then the rest; leaving early cancels the sequence."""
    async with admitted.stream as stream:
        yield admitted.first
        if admitted.first.finish_reason is not None:
            return
        async for event in stream:
            yield event


async def merged_events(choices: list[Admitted]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(choice index, event) of several requests as they come; leaving early cancels them all."""
    if len(choices) == 1:
        async for event in events(choices[0]):
            yield 0, event
        return
    # Bounded: a reader that falls behind leaves the events in each choice's own queue, where
    # the engine counts them against the stream's backlog limit (max_unread).
    arrivals: asyncio.Queue[tuple[int, TokenEvent | BaseException | None]] = asyncio.Queue(
        maxsize=len(choices)
    )

    async def pump(index: int, choice: Admitted) -> None:
        try:
            async for event in events(choice):
                await arrivals.put((index, event))
        except Exception as err:
            await arrivals.put((index, err))
        else:
            await arrivals.put((index, None))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, item = await arrivals.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


def _headers(admitted: Admitted) -> dict[str, str]:
    revision = admitted.revision
    return {} if revision is None else {REVISION_HEADER: revision}


async def _sse(request: web.Request, admitted: Admitted) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            **_headers(admitted),
        }
    )
    await response.prepare(request)
    return response


async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> bool:
    """Write an SSE chunk; False (and status 499) when the client has gone or stopped reading."""
    return await sent(request, response.write(data))


def _event_bytes(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _run_stream(
    request: web.Request,
    choices: list[Admitted],
    chunk: Callable[[int, TokenEvent], list[dict[str, Any]]],
    done: Callable[[list[TokenEvent]], list[bytes]],
    error: Callable[[int, str], bytes],
) -> web.StreamResponse:
    """Send one SSE chunk per event, then the closing chunks; count tokens; stop on disconnect."""
    response = await _sse(request, choices[0])
    lasts: list[TokenEvent | None] = [None] * len(choices)
    try:
        async for index, event in merged_events(choices):
            lasts[index] = event
            for payload in chunk(index, event):
                if not await _write(request, response, _event_bytes(payload)):
                    return response
    except Exception as err:
        # Headers are gone already: the error travels as an event, as OpenAI's streams do.
        if isinstance(err, MintError):
            # What it would be before streaming.
            status, message = status_for(err), request.app[STATE].client_message(err)
        else:  # as the middleware does: details (paths, say) stay in the server's log
            log.error("stream of %s %s failed", request.method, request.path, exc_info=err)
            status = 500
            message = f"internal error ({type(err).__name__}); the server log has the details"
        await _write(request, response, error(status, message))
        request[STATUS_KEY] = status
        return response
    finally:
        for choice, last in zip(choices, lasts, strict=True):
            if last is not None:
                count_tokens(request, choice.label, "completion", last.completion_tokens)
    finished = [last for last in lasts if last is not None]
    assert len(finished) == len(choices)
    for data in done(finished):
        if not await _write(request, response, data):
            return response
    await sent(request, response.write_eof())
    return response


@dataclass
class Collected:
    """One request's whole output."""

    text: str
    last: TokenEvent
    events: list[TokenEvent]

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids."""
        return [e.token_id for e in self.events]


async def _collect(admitted: Admitted, request: web.Request) -> Collected:
    got: list[TokenEvent] = []
    try:
        async for event in events(admitted):
            got.append(event)
    finally:
        if got:
            count_tokens(request, admitted.label, "completion", got[-1].completion_tokens)
    return Collected("".join(e.text for e in got), got[-1], got)


async def _collect_all(choices: list[Admitted], request: web.Request) -> list[Collected]:
    """Every choice's output (an error in one cancels the others)."""
    tasks = [asyncio.ensure_future(_collect(c, request)) for c in choices]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _usage(choices: list[Admitted], lasts: list[TokenEvent], n: int = 1) -> dict[str, Any]:
    """OpenAI's usage: each distinct prompt counted once (n choices share one), every choice's
    tokens, and how many prompt tokens the prefix cache supplied."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    completion = sum(last.completion_tokens for last in lasts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": sum(c.first.cached_tokens for c in choices[::n])
        },
    }


# ---------------------------------------------------------------------------- logprobs
def _logprobs_field(body: dict[str, Any], name: str) -> int | None:
    """An integer count of alternatives in [0, MAX_LOGPROBS], or None when absent."""
    value = field_of(body, name, (int,), None)
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise HTTPError(400, f"{name} must be in [0, {MAX_LOGPROBS}], got {value}", name)
    return cast(int | None, value)


def _prompt_logprobs_field(body: dict[str, Any], stream: bool) -> int | None:
    """vLLM's prompt_logprobs: alternatives per prompt token in [0, MAX_LOGPROBS], or None when
    absent; 400 for -1 (the whole vocabulary) and with a stream, which has no place for them."""
    value = cast(int | None, field_of(body, "prompt_logprobs", (int,), None))
    if value is None:
        return None
    if value == -1:
        raise HTTPError(
            400,
            f"prompt_logprobs=-1 (the whole vocabulary) is not supported; at most {MAX_LOGPROBS} "
            "alternatives per prompt token",
            "prompt_logprobs",
        )
    if not 0 <= value <= MAX_LOGPROBS:
        raise HTTPError(
            400, f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {value}", "prompt_logprobs"
        )
    if stream:
        # vLLM refuses it too (and drops a 0 without a word): no stream chunk carries them.
        raise HTTPError(
            400,
            "prompt_logprobs is not available with stream: true; send the request unstreamed",
            "prompt_logprobs",
        )
    return value


class TokenTexts:
    """Each token id's text, as the logprobs responses name tokens (what it adds after a word, special tokens kept)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        self._alone: dict[int, str] = {}
        self._special: set[int] | None = None

    def add(self, lps: Iterable[TokenLogprobs | None], token_ids: Iterable[int] = ()) -> None:
        """Decode, in one call, every token id these logprobs (and `token_ids`) name that is not known yet."""
        wanted = set(token_ids)
        for lp in lps:
            if lp is not None:
                wanted.add(lp.token_id)
                wanted.update(t for t, _ in lp.top)
        new = sorted(wanted - self.texts.keys())
        if not new:
            return
        if self.tokenizer is None:  # a base without tokenizer.json: vLLM's spelling
            self.texts.update((t, f"token_id:{t}") for t in new)
            return
        # In context, not alone: a SentencePiece token keeps its leading space ("▁the" is
        # " the", as a byte-level one's is), so the texts of the output's tokens join into its text.
        self.texts.update(zip(new, texts_after_a_word(self.tokenizer, new), strict=True))

    def __getitem__(self, token_id: int) -> str:
        return self.texts[token_id]

    def at_start(self, token_id: int) -> str:
        """A token's text at the very start of a text: decoded alone, as the text decodes there
        (a SentencePiece "▁The" is "The" at the start, " The" after a word)."""
        if self.tokenizer is None:
            return self.texts[token_id]
        if token_id not in self._alone:
            self._alone[token_id] = str(
                self.tokenizer.decode([token_id], skip_special_tokens=False)
            )
        return self._alone[token_id]

    def is_special(self, token_id: int) -> bool:
        """Whether a token is one of the tokenizer's special tokens (BOS, EOS), which show no text."""
        if self.tokenizer is None:
            return False
        if self._special is None:
            self._special = special_ids(self.tokenizer)
        return token_id in self._special

    def start_index(self, ids: Sequence[int]) -> int:
        """The index of the first of `ids` that shows text (past BOS and the like); -1 if none."""
        return next((k for k, t in enumerate(ids) if not self.is_special(t)), -1)

    def in_text(self, ids: Sequence[int]) -> list[str]:
        """Each token's text in a text that begins with `ids`: the first shown one as the text
        starts, the others after a word, so that they join into the text."""
        self.add((), ids)
        first = self.start_index(ids)
        return [self.at_start(t) if k == first else self[t] for k, t in enumerate(ids)]

    def decode(self, ids: list[int]) -> str:
        """The text of token ids as a completion shows it (special tokens skipped)."""
        return "" if self.tokenizer is None else str(self.tokenizer.decode(ids))

    def decode_whole_characters(self, ids: list[int]) -> str:
        """The text of token ids up to their last whole character: a prompt of ids may end inside one,
        whose text then comes with the output token that completes it (as DecodeStream gives it)."""
        back, lead = incomplete_tail(self.tokenizer, ids) if self.tokenizer else (0, "")
        return self.decode(ids[: len(ids) - back]) + lead

    def shown_offsets(self, ids: list[int]) -> list[int]:
        """Where each token's text starts in decode(ids), special tokens taking none and the
        tokens of a split character each starting where the character does."""
        shown = IncrementalDetokenizer(self.tokenizer)
        offsets = []
        at = 0
        for token_id in ids:
            offsets.append(at)
            at += len(shown.add(token_id))
        return offsets

    def prompt_offsets(self, prompt: str | list[int], ids: list[int], special: bool) -> list[int]:
        """Where each prompt token's text starts in the prompt as echo returns it.

        A string prompt is echoed as sent, which differs from its decoded text under a
        normalizer (NFC, a prepended space): its offsets come from the tokenizer's alignment
        of each token to the string sent (the tokens of a split character share one span).
        A token with no span there (BOS, or EOS a template adds) starts where the text so
        far ends.
        """
        if isinstance(prompt, str) and self.tokenizer is not None:
            encoding = self.tokenizer.encode(prompt, add_special_tokens=special)
            if list(encoding.ids) == ids:
                offsets, end = [], 0
                for start, stop in encoding.offsets:
                    offsets.append(max(start, end) if start == stop else start)
                    end = max(end, stop)
                return offsets
        return self.shown_offsets(ids)


def _generate_logprobs(lps: list[TokenLogprobs], texts: TokenTexts) -> list[dict[str, Any]]:
    """`/generate`'s logprobs: one object per generated token, with token ids and texts."""
    texts.add(lps)
    return [
        {
            "token_id": lp.token_id,
            "token": texts[lp.token_id],
            "logprob": lp.logprob,
            "top_logprobs": [{"token_id": t, "token": texts[t], "logprob": v} for t, v in lp.top],
        }
        for lp in lps
    ]


class CompletionLogprobs:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset) of one choice, built chunk by chunk."""

    def __init__(
        self,
        texts: TokenTexts,
        offset: int,
        context: Sequence[int] = (),
        prompt_offsets: Sequence[int] = (),
    ) -> None:
        self.texts = texts
        self.offset = offset  # text_offset counts from the start of prompt + completion
        self.prompt_offsets = prompt_offsets  # an echoed prompt's tokens', into the text echoed
        # The shown text, token by token, as the output's is built (in the context of the
        # prompt's tail when it is not echoed): a token that ends inside a character adds
        # nothing until the token that completes it.
        self._shown = IncrementalDetokenizer(texts.tokenizer, context)

    def chunk(
        self,
        lps: list[tuple[int, TokenLogprobs | None]],
        prompt: Sequence[tuple[int, TokenLogprobs | None]] = (),
    ) -> dict[str, Any]:
        """The object for an echoed prompt's entries, then these (token id, logprobs) entries; None logprobs (a first prompt token) stay null."""
        # The first token of an echoed prompt's text (after BOS) reads as the text starts: a
        # SentencePiece "▁The" is "The" there, as the echoed text shows it, not " The".
        first = self.texts.start_index([t for t, _ in prompt])
        lps = [*prompt, *lps]
        self.texts.add((lp for _, lp in lps), (t for t, _ in lps))
        out: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for number, (token_id, lp) in enumerate(lps):
            text_of = self.texts.at_start if number == first else self.texts.__getitem__
            text = text_of(token_id)
            out["tokens"].append(text)
            if number < len(prompt):
                out["text_offset"].append(self.prompt_offsets[number])
            else:
                out["text_offset"].append(self.offset)
                # A skipped special token adds nothing.
                self.offset += len(self._shown.add(token_id))
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top: dict[str, float] = {}
            for alternative, value in lp.top:  # likeliest first: two ids of one text keep the first
                top.setdefault(text_of(alternative), value)
            # OpenAI always includes the chosen token, with its own logprob.
            top[text] = max(top.get(text, -math.inf), lp.logprob)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top)
        return out


def _chat_logprobs(lps: list[TokenLogprobs], texts: TokenTexts) -> dict[str, Any]:
    """The chat `logprobs` object: content entries with token, logprob, bytes and top_logprobs."""
    texts.add(lps)

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = texts[token_id]
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
            for lp in lps
        ]
    }


def _vllm_prompt_logprobs(
    ids: Sequence[int], found: Sequence[TokenLogprobs | None], top: int, texts: TokenTexts
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: null for the first prompt token (nothing predicts it), then per
    token {token id: {logprob, rank, decoded_token}} of the token itself and the `top` likeliest."""
    texts.add(found, ids)

    def entry(token_id: int, logprob: float, rank: int) -> dict[str, Any]:
        # Without tokenizer.json there is no text to give: null, as vLLM's.
        decoded = None if texts.tokenizer is None else texts[token_id]
        return {"logprob": logprob, "rank": rank, "decoded_token": decoded}

    out: list[dict[str, dict[str, Any]] | None] = []
    for lp in found:
        if lp is None:
            out.append(None)
            continue
        # The prompt's token first, with its rank in the whole vocabulary; an alternative that
        # is the token itself keeps that entry.
        position = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
        for rank, (token_id, logprob) in enumerate(lp.top[:top], start=1):
            position.setdefault(str(token_id), entry(token_id, logprob, rank))
        out.append(position)
    assert len(out) == len(ids)
    return out


def _event_logprobs(events: list[TokenEvent]) -> list[TokenLogprobs]:
    return [e.logprobs for e in events if e.logprobs is not None]


# ---------------------------------------------------------------------------- /generate
async def generate(request: web.Request) -> web.StreamResponse:
    """POST /generate: {prompt, ref, max_tokens, temperature, top_p, top_k, seed, stop, stream, logprobs}."""
    state = request.app[STATE]
    body = await read_json(request)
    prompt = field_of(body, "prompt", (str,))
    spec = field_of(body, "ref", (str,), "main")
    stream = field_of(body, "stream", (bool,), False)
    return_ids = field_of(body, "return_token_ids", (bool,), False)
    _refuse_generate_fields(body)
    params = replace(sampling_params(body, state), logprobs=_logprobs_field(body, "logprobs"))
    admitted = await admit(request, prompt, spec, params, stream=stream)
    texts = TokenTexts(state.require_engine(admitted=True).tokenizer)

    def result(text: str, last: TokenEvent) -> dict[str, Any]:
        return {
            "text": text,
            "ref": admitted.spec,
            "revision": admitted.revision,
            "resolved_ref": admitted.resolved_ref,
            "usage": _usage([admitted], [last]),
            "finish_reason": last.finish_reason,
        }

    if not stream:
        got = await _collect(admitted, request)
        out = result(got.text, got.last)
        if return_ids:
            out["token_ids"] = got.token_ids
        if params.logprobs is not None:
            out["logprobs"] = _generate_logprobs(_event_logprobs(got.events), texts)
        return web.json_response(out, headers=_headers(admitted))
    text: list[str] = []

    def chunk(_: int, event: TokenEvent) -> list[dict[str, Any]]:
        text.append(event.text)
        out: dict[str, Any] = {"text": event.text, "index": event.index, "token_id": event.token_id}
        if event.logprobs is not None:
            out["logprobs"] = _generate_logprobs([event.logprobs], texts)[0]
        return [out]

    return await _run_stream(
        request,
        [admitted],
        chunk,
        lambda lasts: [_event_bytes(result("".join(text), lasts[0]), "done")],
        lambda status, message: _event_bytes(error_body(request.path, status, message), "error"),
    )


# ---------------------------------------------------------------------------- OpenAI
def _oai_ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{secrets.token_hex(12)}", int(time.time())


def _oai_error_event(status: int, message: str) -> bytes:
    return _event_bytes(error_body("/v1/", status, message)) + b"data: [DONE]\n\n"


class _OpenAIEnvelope:
    """The fields every OpenAI response object of one request repeats around its choices."""

    def __init__(self, prefix: str, admitted: Admitted, *, usage_null: bool = False) -> None:
        self.id, self.created = _oai_ids(prefix)
        self.admitted = admitted
        # A stream with stream_options.include_usage: every chunk carries "usage", null until
        # the last one (OpenAI's chunk object).
        self.usage_null = usage_null

    def wrap(self, kind: str, *choices: dict[str, Any]) -> dict[str, Any]:
        """One response object (or stream chunk) of type `kind` holding `choices`."""
        revision = self.admitted.revision
        out = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.admitted.spec,
            "system_fingerprint": revision,
            "revision": revision,
            "choices": list(choices),
        }
        if self.usage_null:
            out["usage"] = None
        return out


def _choice_count(body: dict[str, Any], prompts: int) -> int:
    """`n` (choices per prompt), with best_of only at its neutral values; 400 past MAX_CHOICES in all."""
    n = field_of(body, "n", (int,), 1)
    if n < 1:
        raise HTTPError(400, f"n must be at least 1, got {n}", "n")
    best_of = body.get("best_of")
    if best_of is not None and (isinstance(best_of, bool) or best_of not in (1, n)):
        raise HTTPError(
            400,
            f"best_of={best_of!r:.40} is not supported by this server; leave it out",
            "unsupported",
        )
    if n * prompts > MAX_CHOICES:
        raise HTTPError(
            400,
            f"{prompts} prompt(s) x n={n} is {n * prompts} choices; at most {MAX_CHOICES} per request",
            "n",
        )
    return cast(int, n)


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n copies of params; a seed gives choice j the seed + j, so the choices differ and each reproduces."""
    if n == 1 or params.seed is None:
        return [params] * n
    return [replace(params, seed=(params.seed + j) % 2**63) for j in range(n)]


def _completion_prompts(body: dict[str, Any]) -> list[Prompt]:
    """`prompt` as OpenAI takes it: a string, a list of strings, token ids, or a list of token-id lists."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        ids = as_token_ids(prompt)
        if ids is not None:
            return [ids]
        if all(isinstance(p, (str, list)) for p in prompt):
            return list(prompt)
    raise HTTPError(
        400,
        "field 'prompt' must be a string, a list of strings, a list of token ids, "
        "or a list of token-id lists",
        "prompt",
    )


async def _check_prompt_logprobs_size(
    state: ServerState,
    prompts: Sequence[Prompt],
    special: bool,
    copies: int,
    per_token: int,
    asked: str,
) -> None:
    """400 for prompt logprobs (an echo's, prompt_logprobs') that would pass MAX_PROMPT_LOGPROBS
    entries: each of `copies` repeats every prompt token's `per_token`, so a 10 kB request
    (n=1024, a 2000-token prompt, 20 alternatives) asked for a 1 GB answer, gigabytes of memory
    and a minute of the event loop. `asked` names the fields, for the message."""
    lengths = await asyncio.to_thread(
        lambda: [len(_prompt_ids(state, p, special)) for p in prompts]
    )
    entries = copies * sum(lengths) * per_token
    if entries > MAX_PROMPT_LOGPROBS:
        times = f" x n={copies}" if copies > 1 else ""
        raise HTTPError(
            400,
            f"{asked} over {sum(lengths)} prompt tokens{times} is {entries:,} log-probabilities; "
            f"at most {MAX_PROMPT_LOGPROBS:,} per request: ask for fewer alternatives (or a "
            "lower n), or split the prompts over requests",
            "prompt_logprobs" if "prompt_logprobs" in asked else "logprobs",
        )


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, where `model` is the ref."""
    state = request.app[STATE]
    body = await read_json(request)
    prompts = _completion_prompts(body)
    spec = field_of(body, "model", (str,))
    stream = field_of(body, "stream", (bool,), False)
    include_usage = _include_usage(body)
    echo = field_of(body, "echo", (bool,), False)
    _refuse_unsupported(body)
    n = _choice_count(body, len(prompts))
    logprobs = _logprobs_field(body, "logprobs")
    prompt_top = _prompt_logprobs_field(body, stream)
    return_ids = field_of(body, "return_token_ids", (bool,), False)
    # max_tokens 0 with echo scores the prompt only (OpenAI's legacy form; lm-eval sends
    # max_tokens 1 and drops the last token itself): one token is generated and not reported.
    score_only = echo and field_of(body, "max_tokens", (int,), None) == 0
    params = sampling_params({**body, "max_tokens": 1} if score_only else body, state)
    # The engine scores the prompt once, with the alternatives of whichever asks for more: an
    # echo's logprobs and prompt_logprobs each keep their own count of them.
    echo_top = logprobs if echo else None
    wanted = [top for top in (echo_top, prompt_top) if top is not None]
    params = replace(params, logprobs=logprobs, prompt_logprobs=max(wanted, default=None))
    # False: a client that templated its prompt itself (BOS included) sends it as it is.
    special = field_of(body, "add_special_tokens", (bool,), True)
    if wanted:
        asked = [
            f"{name}={top}"
            for name, top in (("echo with logprobs", echo_top), ("prompt_logprobs", prompt_top))
            if top is not None
        ]
        await _check_prompt_logprobs_size(
            state, prompts, special, n, sum(top + 1 for top in wanted), " and ".join(asked)
        )
    requests = [(p, q) for p in prompts for q in _choice_params(params, n)]
    choices = await admit_many(request, requests, spec, stream=stream, special_tokens=special)
    with _cancel_on_error(choices):
        envelope = _OpenAIEnvelope("cmpl", choices[0], usage_null=stream and include_usage)
        engine = state.require_engine(admitted=True)
        texts = TokenTexts(engine.tokenizer)
        # The prompt's text: as sent, or decoded from the token ids sent (echo returns it). Ids
        # that end inside a character leave it to the output token that completes it (scoring
        # the prompt alone, with no such token, shows it as decoded, U+FFFD included).
        decode_ids = texts.decode if score_only else texts.decode_whole_characters
        distinct = {id(p): p for p in prompts}
        decoded = {key: p if isinstance(p, str) else decode_ids(p) for key, p in distinct.items()}
        prompt_texts = [decoded[id(p)] for p, _ in requests]
        echoes = prompt_texts if echo else [""] * len(requests)
        # text_offset indexes the text returned: an echoed prompt's tokens into the prompt as
        # echoed, the completion's from its end, counted on the text the completion shows.
        prompt_offsets: dict[int, list[int]] = {}
        if echo and logprobs is not None:
            by_prompt = {id(p): c.prompt_ids for (p, _), c in zip(requests, choices, strict=True)}

            def locate() -> dict[int, list[int]]:
                return {
                    key: texts.prompt_offsets(p, by_prompt[key], special)
                    for key, p in distinct.items()
                }

            size = sum(len(p) for p in prompts)
            prompt_offsets = await asyncio.to_thread(locate) if size > 16_384 else locate()
        offsets = [
            CompletionLogprobs(texts, len(t), c.prompt_ids, prompt_offsets.get(id(p), ()))
            for t, (p, _), c in zip(prompt_texts, requests, choices, strict=True)
        ]

        def prompt_entries(i: int) -> list[tuple[int, TokenLogprobs | None]]:
            found = choices[i].first.prompt_logprobs
            if echo_top is None or found is None:
                return []
            kept = [None if lp is None else lp.keep_top(echo_top) for lp in found]
            return list(zip(choices[i].prompt_ids, kept, strict=True))

        scored: dict[int, list[dict[str, dict[str, Any]] | None]] = {}

        def vllm_prompt_logprobs(i: int) -> dict[str, Any]:
            """The choice's `prompt_logprobs` field, when asked; its prompt's other choices share one list."""
            if prompt_top is None:
                return {}
            key = id(requests[i][0])
            if key not in scored:
                found = choices[i].first.prompt_logprobs
                assert found is not None
                scored[key] = _vllm_prompt_logprobs(choices[i].prompt_ids, found, prompt_top, texts)
            return {"prompt_logprobs": scored[key]}

        def lp_object(i: int, evs: list[TokenEvent], with_prompt: bool) -> dict[str, Any] | None:
            if logprobs is None:
                return None
            prompt = prompt_entries(i) if with_prompt else []
            generated = [] if score_only else [(e.token_id, e.logprobs) for e in evs]
            return offsets[i].chunk(generated, prompt)

        def obj(*items: dict[str, Any]) -> dict[str, Any]:
            return envelope.wrap("text_completion", *items)

        def ids(i: int, evs: list[TokenEvent], first: bool) -> dict[str, Any]:
            generated = [] if score_only else evs
            return _token_id_fields(choices[i], generated, first) if return_ids else {}

        if not stream:
            got = await _collect_all(choices, request)
            out = obj(
                *(
                    {
                        "text": echoes[i] + ("" if score_only else g.text),
                        "index": i,
                        "logprobs": lp_object(i, g.events, True),
                        "finish_reason": g.last.finish_reason,
                        **ids(i, g.events, True),
                        **vllm_prompt_logprobs(i),
                    }
                    for i, g in enumerate(got)
                )
            )
            out["usage"] = _completion_usage(choices, [g.last for g in got], n, score_only)
            return web.json_response(out, headers=_headers(choices[0]))
        started = [False] * len(choices)
        pending: list[list[TokenEvent]] = [[] for _ in choices]

        def chunk(i: int, event: TokenEvent) -> list[dict[str, Any]]:
            first = not started[i]
            started[i] = True
            pending[i].append(event)
            text = echoes[i] * first + ("" if score_only else event.text)
            out: list[dict[str, Any]] = []
            # Held-back text (inside a character or a possible stop string) sends nothing: its
            # logprobs go with the next chunk of that choice.
            if text or first:
                evs, pending[i] = pending[i], []
                item = {"text": text, "index": i, "logprobs": lp_object(i, evs, first)}
                out.append(obj({**item, "finish_reason": None, **ids(i, evs, first)}))
            if event.finish_reason is not None:  # each choice ends when it ends
                evs, pending[i] = pending[i], []
                item = {
                    "text": "",
                    "index": i,
                    "logprobs": lp_object(i, evs, False) if evs else None,
                }
                out.append(
                    obj({**item, "finish_reason": event.finish_reason, **ids(i, evs, False)})
                )
            return out

        def done(lasts: list[TokenEvent]) -> list[bytes]:
            chunks = []
            if include_usage:
                tail = obj()
                tail["usage"] = _completion_usage(choices, lasts, n, score_only)
                chunks.append(_event_bytes(tail))
            return [*chunks, b"data: [DONE]\n\n"]

        return await _run_stream(request, choices, chunk, done, _oai_error_event)


@contextlib.contextmanager
def _cancel_on_error(choices: list[Admitted]) -> Iterator[None]:
    """Cancel every choice's sequence if building the response fails before it owns them."""
    try:
        yield
    except BaseException:
        for choice in choices:
            choice.stream.cancel()
        raise


def _include_usage(body: dict[str, Any]) -> bool:
    """stream_options.include_usage; 400 unless stream_options is an object and the flag a boolean."""
    options = field_of(body, "stream_options", (dict,), {})
    return cast(bool, field_of(options, "include_usage", (bool,), False))


def _token_id_fields(choice: Admitted, events: list[TokenEvent], first: bool) -> dict[str, Any]:
    """vLLM's return_token_ids fields: the generated ids of these events, and the prompt's with the first."""
    out: dict[str, Any] = {"token_ids": [e.token_id for e in events]}
    if first:
        out["prompt_token_ids"] = choice.prompt_ids
    return out


def _completion_usage(
    choices: list[Admitted], lasts: list[TokenEvent], n: int, score_only: bool
) -> dict[str, Any]:
    usage = _usage(choices, lasts, n)
    if score_only:  # the one token generated to score the prompt is not an output
        usage["total_tokens"] -= usage["completion_tokens"]
        usage["completion_tokens"] = 0
    return usage


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, where `model` is the ref."""
    state = request.app[STATE]
    body = await read_json(request)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise HTTPError(400, "field 'messages' must be a non-empty list", "messages")
    messages = [chat_message(m, i) for i, m in enumerate(raw)]
    spec = field_of(body, "model", (str,))
    stream = field_of(body, "stream", (bool,), False)
    include_usage = _include_usage(body)
    _refuse_unsupported(body, chat=True)
    plan = parse_tools(body, state.config.tool_call_parser)
    calling = plan is not None and plan.calling
    n = _choice_count(body, 1)
    want_logprobs = field_of(body, "logprobs", (bool,), False)
    return_ids = field_of(body, "return_token_ids", (bool,), False)
    top = _logprobs_field(body, "top_logprobs")
    if top and not want_logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    prompt_top = _prompt_logprobs_field(body, stream)
    params = sampling_params(body, state, to_context_end=True)
    params = replace(
        params, logprobs=(top or 0) if want_logprobs else None, prompt_logprobs=prompt_top
    )
    forced = None if plan is None else plan.structured()
    if forced is not None:
        if params.structured is not None:
            raise HTTPError(
                400,
                "a tool_choice that requires calls decides the output's form: send it without "
                "response_format or structured_outputs",
                "tool_choice",
            )
        params = replace(params, structured=forced)
    reader = None if plan is None or plan.choice != "auto" else plan.format
    if reader is not None and reader.needs_special_tokens(state.require_engine().tokenizer):
        # Its markers are special tokens here: left out of the text, the calls would be lost.
        params = replace(params, skip_special_tokens=False)
    prompt, templated = _render_conversation(
        state, body, messages, None if plan is None else list(plan.tools)
    )
    # A chat template writes BOS itself; the tokenizer adding another would shift every logit.
    special = field_of(body, "add_special_tokens", (bool,), not templated)
    if prompt_top is not None:  # once per response, not per choice (vLLM's top-level field)
        await _check_prompt_logprobs_size(
            state, [prompt], special, 1, prompt_top + 1, f"prompt_logprobs={prompt_top}"
        )
    choices = await admit_many(
        request,
        [(prompt, q) for q in _choice_params(params, n)],
        spec,
        stream=stream,
        special_tokens=special,
    )
    with _cancel_on_error(choices):
        obj = _OpenAIEnvelope("chatcmpl", choices[0], usage_null=stream and include_usage).wrap
        texts = TokenTexts(state.require_engine(admitted=True).tokenizer)

        def lp_object(evs: list[TokenEvent]) -> dict[str, Any] | None:
            return _chat_logprobs(_event_logprobs(evs), texts) if want_logprobs else None

        def ids(i: int, evs: list[TokenEvent], first: bool) -> dict[str, Any]:
            return _token_id_fields(choices[i], evs, first) if return_ids else {}

        def call_reason(calls: list[Any] | None, reason: str | None) -> str | None:
            """A finished choice's finish_reason, given the calls its reply holds."""
            # OpenAI: "tool_calls" when the model chose to call; a named call ends as "stop".
            if calls is not None and plan is not None and plan.choice != "function":
                return "tool_calls" if reason == "stop" else reason
            return reason

        def reply(text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
            """The message of a finished choice, and its finish_reason."""
            content, calls = (text, None) if plan is None else plan.split(text)
            if calls is None:
                return {"role": "assistant", "content": text}, reason
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            return message, call_reason(calls, reason)

        if not stream:
            got = await _collect_all(choices, request)
            replies = [reply(g.text, g.last.finish_reason) for g in got]
            out = obj(
                "chat.completion",
                *(
                    {
                        "index": i,
                        "message": message,
                        "logprobs": lp_object(g.events),
                        "finish_reason": reason,
                        **ids(i, g.events, True),
                    }
                    for i, (g, (message, reason)) in enumerate(zip(got, replies, strict=True))
                ),
            )
            out["usage"] = _usage(choices, [g.last for g in got], n)
            if prompt_top is not None:
                found = choices[0].first.prompt_logprobs
                assert found is not None
                out["prompt_logprobs"] = _vllm_prompt_logprobs(
                    choices[0].prompt_ids, found, prompt_top, texts
                )
            return web.json_response(out, headers=_headers(choices[0]))
        started = [False] * len(choices)
        pending: list[list[TokenEvent]] = [[] for _ in choices]
        # Tool calls: a named call streams its arguments as they come; "required" calls (a
        # list, parsed when complete) go out in one chunk at the end; under "auto", text
        # streams as content until a call may be starting, and the calls go out at the end.
        named = plan is not None and plan.choice == "function"
        call_ids = [f"call_{secrets.token_hex(12)}" for _ in choices]
        written = ["" for _ in choices]
        sent = [0] * len(choices)  # characters of written[i] already sent as content
        reasons: list[str | None] = [None] * len(choices)  # set where calls change it

        def tool_delta(i: int, event: TokenEvent, first: bool) -> dict[str, Any] | None:
            """A chunk's delta for a tool-calling choice (None: nothing to send yet)."""
            assert plan is not None
            written[i] += event.text
            text = written[i]
            if named:
                call: dict[str, Any] = {"index": 0, "function": {"arguments": event.text}}
                if first:
                    call.update(id=call_ids[i], type="function")
                    call["function"]["name"] = plan.name
                delta: dict[str, Any] = {"role": "assistant", "content": None} if first else {}
                return {**delta, "tool_calls": [call]} if event.text or first else None
            delta = {"role": "assistant", "content": None} if first else {}
            if event.finish_reason is None:
                if plan.choice == "auto" and plan.format is not None:
                    safe = plan.format.streamable(text)  # up to where a call could be starting
                    if not text[:safe].strip():  # blank so far: it may only lead up to a call
                        safe = 0
                    if safe > sent[i]:
                        delta["content"] = text[sent[i] : safe]
                        sent[i] = safe
                return delta or None
            content, calls = plan.split(text)
            reasons[i] = call_reason(calls, event.finish_reason)
            if calls is None:  # no calls: the rest as text (all of it, if cut short)
                delta["content"] = text[sent[i] :]
            else:
                # The content before the calls (None when blank: never streamed then).
                if content is not None and plan.choice == "auto" and len(content) > sent[i]:
                    delta["content"] = content[sent[i] :]
                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(calls)]
            return delta

        def chunk(i: int, event: TokenEvent) -> list[dict[str, Any]]:
            pending[i].append(event)
            first = not started[i]
            started[i] = True
            out: list[dict[str, Any]] = []
            delta: dict[str, Any] | None = None
            if calling:
                delta = tool_delta(i, event, first)
            # Held-back text sends nothing: its logprobs go with the choice's next chunk.
            elif event.text or first:
                delta = {"role": "assistant"} if first else {}
                delta["content"] = event.text
            if delta is not None:
                evs, pending[i] = pending[i], []
                item = {"index": i, "delta": delta, "logprobs": lp_object(evs)}
                out.append(
                    obj(
                        "chat.completion.chunk",
                        {**item, "finish_reason": None, **ids(i, evs, first)},
                    )
                )
            if event.finish_reason is not None:  # each choice ends when it ends
                evs, pending[i] = pending[i], []
                item = {"index": i, "delta": {}, "logprobs": lp_object(evs) if evs else None}
                reason = reasons[i] or event.finish_reason
                out.append(
                    obj(
                        "chat.completion.chunk",
                        {**item, "finish_reason": reason, **ids(i, evs, False)},
                    )
                )
            return out

        def done(lasts: list[TokenEvent]) -> list[bytes]:
            chunks = []
            if include_usage:
                tail = obj("chat.completion.chunk")
                tail["usage"] = _usage(choices, lasts, n)
                chunks.append(_event_bytes(tail))
            return [*chunks, b"data: [DONE]\n\n"]

        return await _run_stream(request, choices, chunk, done, _oai_error_event)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: the base alone, then branches and tags with the revision each names now (`?prefix=`, `?limit=`)."""
    state = request.app[STATE]
    prefix = request.query.get("prefix", "")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise HTTPError(
            400, f"limit must be an integer, got {request.query.get('limit')!r}", "limit"
        ) from None
    if not 1 <= limit <= MAX_MODELS_LIMIT:
        raise HTTPError(
            400, f"limit must be in [1, {MAX_MODELS_LIMIT}], got {limit}; page with prefix", "limit"
        )
    if ".." in prefix or any(ord(c) < 32 or c == "\x7f" for c in prefix):
        # As for a ref: the prefix is a path under refs/, never a way out of it.
        raise HTTPError(400, f"prefix {prefix!r:.60} holds '..' or control characters", "prefix")
    # Off the loop: up to MAX_MODELS_LIMIT refs read and peeled take a second or more.
    return web.json_response(await asyncio.to_thread(_list_models, state, prefix, limit))


def _list_models(state: ServerState, prefix: str, limit: int) -> dict[str, Any]:
    """The /v1/models listing; a ref that cannot be read is left out and logged, as git
    for-each-ref ignores a broken ref."""

    def broken(name: str, err: MintError) -> None:
        log.warning("/v1/models leaves out %s: %s", name, err)

    state.repo.check_present()  # a repository gone lists no ref: not an empty listing
    data: list[dict[str, Any]] = []
    if state.config.base_name.startswith(prefix):
        data.append(_base_object(state))
    truncated = False
    for kind, root in _MODEL_KINDS:
        listing = state.repo.refs.iter_refs(root + prefix if prefix else root, on_broken=broken)
        for name, oid in listing:
            if len(data) >= limit:
                truncated = True
                break
            if not name.isascii():
                try:
                    name.encode("utf-8")
                except UnicodeEncodeError:  # JSON cannot carry it, no client could send it back
                    broken(name, InvalidRefNameError(name, "it is not UTF-8"))
                    continue
            try:
                commit, what = state.repo.peel_object(oid)
                if what != "commit":
                    continue  # a git tag of a tree or blob names no revision to serve
                entry = _model_object(state, kind, name, commit)
            except MintError as err:  # its object is missing or corrupt
                broken(name, err)
                continue
            if entry["id"] == state.config.base_name or state.watcher.ref_of(entry["id"]) != name:
                # Its short name serves the base, or another ref or object (a tag, `refs/NAME`,
                # a pseudo-ref, a commit of those 40 digits: git's order, which /generate
                # follows): the full name reaches it.
                entry["id"] = name
            data.append(entry)
    return {"object": "list", "data": data, "truncated": truncated}


_MODEL_KINDS = (("branch", "refs/heads/"), ("tag", "refs/tags/"))


def _model_object(state: ServerState, kind: str, ref: str, commit: str) -> dict[str, Any]:
    """The /v1/models entry of `ref`, which names `commit` (tags already peeled)."""
    return {
        "id": ref.removeprefix("refs/heads/").removeprefix("refs/tags/"),
        "object": "model",
        "created": _commit_time(state, commit),
        "owned_by": "mintvcs",
        "kind": kind,
        "ref": ref,
        "revision": commit,
        "parent": state.config.base_name,  # as vLLM lists a LoRA: on top of its base
    }


def _base_object(state: ServerState) -> dict[str, Any]:
    """The base model alone, as /v1/models lists it."""
    return {
        "id": state.config.base_name,
        "object": "model",
        "created": int(state.started),
        "owned_by": "mintvcs",
        "kind": "base",
        "ref": None,
        "revision": None,
        "parent": None,
    }


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: the base, or one branch or tag, as /v1/models lists it; 404 when none is."""
    state = request.app[STATE]
    name = check_spec(request.match_info["id"])
    if name == state.config.base_name:
        return web.json_response(_base_object(state))
    # The ref /generate would serve for the name, in git's order (a tag before a branch, a
    # pseudo-ref or a commit of those 40 digits before either), listed when it is a branch or tag.
    ref = await asyncio.to_thread(state.watcher.ref_of, name)
    for kind, root in _MODEL_KINDS:
        if ref is not None and ref.startswith(root):
            try:
                oid = state.repo.refs.read(ref)
            except InvalidRefNameError:
                oid = None
            if oid is not None:
                entry = _model_object(state, kind, ref, state.repo.peel(oid))
                entry["id"] = name
                return web.json_response(entry)
    state.repo.check_present()  # no such ref, or no repository any more
    raise HTTPError(404, f"no branch or tag named {name!r}; GET /v1/models lists them", "not_found")


_COMMIT_TIMES: dict[str, int] = {}


def _commit_time(state: ServerState, commit: str) -> int:
    when = _COMMIT_TIMES.get(commit)
    if when is None:
        try:
            when = int(state.repo.commit_info(commit).time)
        except MintError:
            when = 0
        if len(_COMMIT_TIMES) > 100_000:
            _COMMIT_TIMES.clear()
        _COMMIT_TIMES[commit] = when
    return when


# ---------------------------------------------------------------------------- tokenizer
async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize (vLLM's): the token ids of a prompt, or of a conversation through the chat template."""
    state = request.app[STATE]
    engine = state.require_engine()
    body = await read_json(request)
    if "messages" in body:
        raw = body["messages"]
        if not isinstance(raw, list) or not raw:
            raise HTTPError(400, "field 'messages' must be a non-empty list", "messages")
        messages = [chat_message(m, i) for i, m in enumerate(raw)]
        text, templated = _render_conversation(state, body, messages, offered_tools(body) or None)
        special = field_of(body, "add_special_tokens", (bool,), not templated)
    else:
        text = field_of(body, "prompt", (str,))
        special = field_of(body, "add_special_tokens", (bool,), True)
    _check_prompt_bytes(state, text)
    ids = engine.encode(text, special_tokens=special)
    out: dict[str, Any] = {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
    if field_of(body, "return_token_strs", (bool,), False):
        out["token_strs"] = TokenTexts(engine.tokenizer).in_text(ids)
    return web.json_response(out)


async def detokenize(request: web.Request) -> web.Response:
    """POST /detokenize (vLLM's): the text of token ids, special tokens kept."""
    state = request.app[STATE]
    engine = state.require_engine()
    body = await read_json(request)
    field_of(body, "tokens", (list,))  # required
    ids = _token_ids(body, "tokens", engine.max_model_len)
    vocab = engine.model.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise HTTPError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "tokens")
    if engine.tokenizer is None:
        raise HTTPError(400, "the base model has no tokenizer.json to decode with", "tokens")
    return web.json_response(
        {"prompt": engine.tokenizer.decode(list(ids), skip_special_tokens=False)}
    )


def add_routes(app: web.Application) -> None:
    """Register the generation and model routes."""
    app.router.add_post("/generate", generate, expect_handler=expect_body)
    app.router.add_post("/v1/completions", completions, expect_handler=expect_body)
    app.router.add_post("/v1/chat/completions", chat_completions, expect_handler=expect_body)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id:.+}", model)
    app.router.add_post("/tokenize", tokenize, expect_handler=expect_body)
    app.router.add_post("/detokenize", detokenize, expect_handler=expect_body)
