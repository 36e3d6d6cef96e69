"""Generation endpoints: `POST /generate`, OpenAI-compatible `/v1/completions`, `/v1/chat/completions`,
`/v1/models`, and their server-sent-event streams.

Every generation request resolves its ref once, at admission, through the ref watcher; the commit id
it got is the revision the whole request runs on (reported in the body and in `X-Mint-Revision`).
The first token (or the engine's refusal) is awaited before the response starts, so that a refused
revision is still a clean 422 even for a streaming request.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mintvcs.errors import MintError
from mintvcs.refs import InvalidRefNameError
from mintvcs.serve.app import (
    REF_KEY,
    STARTED_KEY,
    STATE,
    STATUS_KEY,
    HTTPError,
    ServerState,
    error_body,
    field_of,
    read_json,
)
from mintvcs.serve.refwatch import Resolution, check_spec
from mintvcs.serve.sampling import SamplingParams
from mintvcs.serve.scheduler import TokenEvent

log = logging.getLogger("mintvcs.serve")

REVISION_HEADER = "X-Mint-Revision"
MAX_STOP_STRINGS = 16
# The template used when the base has no chat_template: one "role: content" line per message, then the
# assistant's turn. Documented in docs/http.md.
PLAIN_CHAT_SEPARATOR = "\n"


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
    OpenAI does) it runs to the end of the context, or to the server's limit if that comes first.
    """
    limit = state.config.max_tokens_limit
    default = limit if to_context_end else state.config.default_max_tokens
    max_tokens = field_of(body, "max_tokens", (int,), default)
    # OpenAI's newer name wins over the deprecated one when a client sends both.
    max_tokens = field_of(body, "max_completion_tokens", (int,), max_tokens)
    if max_tokens < 1 or max_tokens > limit:
        raise HTTPError(400, f"max_tokens must be in [1, {limit}], got {max_tokens}", "max_tokens")
    temperature = field_of(body, "temperature", (float,), default_temperature)
    top_p = field_of(body, "top_p", (float,), 1.0)
    top_k = field_of(body, "top_k", (int,), 0)
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
    )


# OpenAI (and vLLM) request fields that change what is generated, with the values that change
# nothing: anything else is refused, since ignoring it would silently return other text.
_NEUTRAL: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "suffix": ("",),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "min_tokens": (0,),
    "min_p": (0,),
    "stop_token_ids": ([],),
    "tools": ([],),
    "functions": ([],),
    "response_format": ({"type": "text"},),
    "guided_json": (),
    "guided_regex": (),
    "guided_choice": (),
    "guided_grammar": (),
}


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """400 for an OpenAI field this server does not implement, unless its value is the neutral one."""
    for name, neutral in _NEUTRAL.items():
        value = body.get(name)
        # 0.0 counts as 0, but True is not 1: JSON's booleans and numbers are different values.
        if value is None or any(
            value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral
        ):
            continue
        raise HTTPError(
            400,
            f"{name}={value!r:.80} is not supported by this server; leave it out",
            "unsupported",
        )


@dataclass
class Admitted:
    """A request that passed validation, resolved its ref, and got its first event."""

    spec: str
    label: str  # the metrics label: the branch or tag it went through (ServerState.ref_label)
    resolution: Resolution
    stream: Any  # RequestStream
    first: TokenEvent
    prompt_tokens: int


async def admit(
    request: web.Request,
    prompt: str,
    spec: object,
    params: SamplingParams,
    *,
    stream: bool,
    special_tokens: bool = True,
) -> Admitted:
    """Check size, resolve the ref once, submit, and await the first event (errors become 4xx).

    Without `stream`, the tokens after the first reach this loop together when the request ends.
    `special_tokens=False` encodes the prompt as it is (a chat template writes its own BOS).
    """
    state = request.app[STATE]
    engine = state.require_engine()
    if not isinstance(prompt, str) or not prompt:
        raise HTTPError(400, "prompt must be a non-empty string", "prompt")
    size = len(prompt.encode("utf-8", "surrogatepass"))
    if size > state.config.max_prompt_bytes:
        raise HTTPError(
            413,
            f"the prompt is {size} bytes; this server takes at most {state.config.max_prompt_bytes}",
            "prompt_too_large",
        )
    ids = engine.encode(prompt, special_tokens=special_tokens)
    if len(ids) >= engine.max_model_len:
        raise HTTPError(
            413,
            f"the prompt is {len(ids)} tokens; the model context is {engine.max_model_len}",
            "prompt_too_long",
        )
    name = check_spec(spec)
    resolution = state.watcher.resolve(name)
    label = state.ref_label(resolution.ref)
    request[REF_KEY] = label
    submitted = engine.submit(ids, resolution.commit, params, stream=stream)
    try:
        first = await submitted.__anext__()
    except BaseException:
        submitted.cancel()
        raise
    state.tokens.inc((label, "prompt"), len(ids))
    state.first_token_latency.observe(time.monotonic() - request[STARTED_KEY])
    return Admitted(name, label, resolution, submitted, first, len(ids))


async def events(admitted: Admitted) -> AsyncIterator[TokenEvent]:
    """The first event, then the rest; leaving early cancels the sequence."""
    async with admitted.stream as stream:
        yield admitted.first
        if admitted.first.finish_reason is not None:
            return
        async for event in stream:
            yield event


def _headers(admitted: Admitted) -> dict[str, str]:
    return {REVISION_HEADER: admitted.resolution.commit}


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
    """Write an SSE chunk; False (and status 499) when the client has gone."""
    try:
        await response.write(data)
    except (ConnectionError, RuntimeError):
        request[STATUS_KEY] = 499
        return False
    return True


def _event_bytes(payload: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def _run_stream(
    request: web.Request,
    admitted: Admitted,
    chunk: Callable[[TokenEvent], dict[str, Any] | None],
    done: Callable[[str, TokenEvent], list[bytes]],
    error: Callable[[str], bytes],
) -> web.StreamResponse:
    """Send one SSE chunk per event, then the closing chunks; count tokens; stop on disconnect."""
    state = request.app[STATE]
    response = await _sse(request, admitted)
    text: list[str] = []
    last: TokenEvent | None = None
    try:
        async for event in events(admitted):
            last = event
            text.append(event.text)
            payload = chunk(event)
            if payload is not None and not await _write(request, response, _event_bytes(payload)):
                return response
    except Exception as err:
        # Headers are gone already: the error travels as an event, as OpenAI's streams do.
        if isinstance(err, MintError):
            message = str(err)
        else:  # as the middleware does: details (paths, say) stay in the server's log
            log.error("stream of %s %s failed", request.method, request.path, exc_info=err)
            message = f"internal error ({type(err).__name__}); the server log has the details"
        await _write(request, response, error(message))
        request[STATUS_KEY] = 500
        return response
    finally:
        if last is not None:
            state.tokens.inc((admitted.label, "completion"), last.completion_tokens)
    assert last is not None
    for data in done("".join(text), last):
        if not await _write(request, response, data):
            return response
    await response.write_eof()
    return response


async def _collect(admitted: Admitted, state: ServerState) -> tuple[str, TokenEvent, list[int]]:
    text: list[str] = []
    ids: list[int] = []
    last = admitted.first
    async for event in events(admitted):
        text.append(event.text)
        ids.append(event.token_id)
        last = event
    state.tokens.inc((admitted.label, "completion"), last.completion_tokens)
    return "".join(text), last, ids


def _usage(admitted: Admitted, last: TokenEvent) -> dict[str, int]:
    return {
        "prompt_tokens": admitted.prompt_tokens,
        "completion_tokens": last.completion_tokens,
        "total_tokens": admitted.prompt_tokens + last.completion_tokens,
    }


# ---------------------------------------------------------------------------- /generate
async def generate(request: web.Request) -> web.StreamResponse:
    """POST /generate: {prompt, ref, max_tokens, temperature, top_p, top_k, seed, stop, stream}."""
    state = request.app[STATE]
    body = await read_json(request)
    prompt = field_of(body, "prompt", (str,))
    spec = field_of(body, "ref", (str,), "main")
    stream = field_of(body, "stream", (bool,), False)
    return_ids = field_of(body, "return_token_ids", (bool,), False)
    params = sampling_params(body, state)
    admitted = await admit(request, prompt, spec, params, stream=stream)

    def result(text: str, last: TokenEvent) -> dict[str, Any]:
        return {
            "text": text,
            "ref": admitted.spec,
            "revision": admitted.resolution.commit,
            "resolved_ref": admitted.resolution.ref,
            "usage": _usage(admitted, last),
            "finish_reason": last.finish_reason,
        }

    if not stream:
        text, last, ids = await _collect(admitted, state)
        out = result(text, last)
        if return_ids:
            out["token_ids"] = ids
        return web.json_response(out, headers=_headers(admitted))
    return await _run_stream(
        request,
        admitted,
        lambda e: {"text": e.text, "index": e.index, "token_id": e.token_id},
        lambda text, last: [_event_bytes(result(text, last), "done")],
        lambda message: _event_bytes(error_body(request.path, 500, message), "error"),
    )


# ---------------------------------------------------------------------------- OpenAI
def _oai_ids(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{secrets.token_hex(12)}", int(time.time())


def _oai_error_event(message: str) -> bytes:
    return _event_bytes(error_body("/v1/", 500, message)) + b"data: [DONE]\n\n"


class _OpenAIEnvelope:
    """The fields every OpenAI response object of one request repeats around its choice."""

    def __init__(self, prefix: str, admitted: Admitted) -> None:
        self.id, self.created = _oai_ids(prefix)
        self.admitted = admitted

    def wrap(self, kind: str, choice: dict[str, Any]) -> dict[str, Any]:
        """One response object (or stream chunk) of type `kind` holding `choice`."""
        revision = self.admitted.resolution.commit
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.admitted.spec,
            "system_fingerprint": revision,
            "revision": revision,
            "choices": [choice],
        }


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions, where `model` is the ref."""
    state = request.app[STATE]
    body = await read_json(request)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # the openai client may wrap a single prompt in a list
    if not isinstance(prompt, str):
        raise HTTPError(400, "field 'prompt' must be a string (one prompt per request)", "prompt")
    spec = field_of(body, "model", (str,))
    stream = field_of(body, "stream", (bool,), False)
    _refuse_unsupported(body)
    params = sampling_params(body, state)
    admitted = await admit(request, prompt, spec, params, stream=stream)
    envelope = _OpenAIEnvelope("cmpl", admitted)

    def obj(choice: dict[str, Any]) -> dict[str, Any]:
        return envelope.wrap("text_completion", choice)

    if not stream:
        text, last, _ = await _collect(admitted, state)
        out = obj({"text": text, "index": 0, "logprobs": None, "finish_reason": last.finish_reason})
        out["usage"] = _usage(admitted, last)
        return web.json_response(out, headers=_headers(admitted))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def done(text: str, last: TokenEvent) -> list[bytes]:
        final = obj({"text": "", "index": 0, "logprobs": None, "finish_reason": last.finish_reason})
        chunks = [_event_bytes(final)]
        if include_usage:
            tail = obj({})
            tail["choices"] = []
            tail["usage"] = _usage(admitted, last)
            chunks.append(_event_bytes(tail))
        return [*chunks, b"data: [DONE]\n\n"]

    return await _run_stream(
        request,
        admitted,
        lambda e: (
            obj({"text": e.text, "index": 0, "logprobs": None, "finish_reason": None})
            if e.text
            else None
        ),
        done,
        _oai_error_event,
    )


def _message_text(message: Any, index: int) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise HTTPError(
            400, f"messages[{index}] must be an object with role and content", "messages"
        )
    role = message.get("role")
    content = message.get("content")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise HTTPError(
            400,
            f"messages[{index}].role {role!r} is not system, developer, user, assistant or tool",
            "messages",
        )
    if isinstance(content, list):
        # OpenAI content parts: keep the text ones, refuse images and audio rather than drop them silently.
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
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise HTTPError(
            400, f"messages[{index}].content must be a string or text parts", "messages"
        )
    return role, content


def render_chat(
    messages: list[tuple[str, str]], tokenizer_config: dict[str, Any]
) -> tuple[str, bool]:
    """The prompt for a conversation, and whether the tokenizer's Jinja chat_template wrote it (else the plain template)."""
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: take "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str) and template:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise HTTPError(
                400, f"the chat template refused the conversation: {message}", "chat_template"
            )

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception

        def token(name: str) -> str:
            value = tokenizer_config.get(name)
            if isinstance(value, dict):  # AddedToken form
                value = value.get("content")
            return value if isinstance(value, str) else ""

        try:
            rendered = env.from_string(template).render(
                messages=[{"role": r, "content": c} for r, c in messages],
                add_generation_prompt=True,
                bos_token=token("bos_token"),
                eos_token=token("eos_token"),
            )
        except TemplateError as err:
            raise HTTPError(
                400, f"the base model's chat template failed: {err}", "chat_template"
            ) from None
        return rendered, True
    lines = [f"{role}: {content}" for role, content in messages]
    return PLAIN_CHAT_SEPARATOR.join([*lines, "assistant:"]), False


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions, where `model` is the ref."""
    state = request.app[STATE]
    body = await read_json(request)
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise HTTPError(400, "field 'messages' must be a non-empty list", "messages")
    messages = [_message_text(m, i) for i, m in enumerate(raw)]
    spec = field_of(body, "model", (str,))
    stream = field_of(body, "stream", (bool,), False)
    _refuse_unsupported(body)
    params = sampling_params(body, state, to_context_end=True)
    prompt, templated = render_chat(messages, state.tokenizer_config)
    # A chat template writes BOS itself; the tokenizer adding another would shift every logit.
    admitted = await admit(
        request, prompt, spec, params, stream=stream, special_tokens=not templated
    )
    obj = _OpenAIEnvelope("chatcmpl", admitted).wrap

    if not stream:
        text, last, _ = await _collect(admitted, state)
        out = obj(
            "chat.completion",
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": last.finish_reason,
            },
        )
        out["usage"] = _usage(admitted, last)
        return web.json_response(out, headers=_headers(admitted))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    started = False

    def chunk(event: TokenEvent) -> dict[str, Any] | None:
        nonlocal started
        delta: dict[str, Any] = {}
        if not started:
            delta["role"] = "assistant"
            started = True
        if event.text or delta:
            delta["content"] = event.text
            return obj(
                "chat.completion.chunk",
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None},
            )
        return None

    def done(text: str, last: TokenEvent) -> list[bytes]:
        chunks = [
            _event_bytes(
                obj(
                    "chat.completion.chunk",
                    {
                        "index": 0,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": last.finish_reason,
                    },
                )
            )
        ]
        if include_usage:
            tail = obj("chat.completion.chunk", {})
            tail["choices"] = []
            tail["usage"] = _usage(admitted, last)
            chunks.append(_event_bytes(tail))
        return [*chunks, b"data: [DONE]\n\n"]

    return await _run_stream(request, admitted, chunk, done, _oai_error_event)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models: branches and tags with the revision each names now (`?prefix=`, `?limit=`)."""
    state = request.app[STATE]
    prefix = request.query.get("prefix", "")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError:
        raise HTTPError(
            400, f"limit must be an integer, got {request.query.get('limit')!r}", "limit"
        ) from None
    if limit < 1:
        raise HTTPError(400, f"limit must be at least 1, got {limit}", "limit")
    data: list[dict[str, Any]] = []
    truncated = False
    for kind, root in _MODEL_KINDS:
        for name, oid in state.repo.refs.iter_refs(root + prefix if prefix else root):
            if len(data) >= limit:
                truncated = True
                break
            if state.repo.peel_object(oid)[1] != "commit":
                continue  # a git tag of a tree or blob names no revision to serve
            data.append(_model_object(state, kind, name, oid))
    return web.json_response({"object": "list", "data": data, "truncated": truncated})


_MODEL_KINDS = (("branch", "refs/heads/"), ("tag", "refs/tags/"))


def _model_object(state: ServerState, kind: str, ref: str, oid: str) -> dict[str, Any]:
    commit = state.repo.peel(oid)
    return {
        "id": ref.removeprefix("refs/heads/").removeprefix("refs/tags/"),
        "object": "model",
        "created": _commit_time(state, commit),
        "owned_by": "mintvcs",
        "kind": kind,
        "ref": ref,
        "revision": commit,
    }


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: one branch or tag, as /v1/models lists it; 404 when neither exists."""
    state = request.app[STATE]
    name = check_spec(request.match_info["id"])
    for kind, root in _MODEL_KINDS:
        try:
            oid = state.repo.refs.read(root + name)
        except InvalidRefNameError:
            oid = None  # no branch or tag can have that name
        if oid is not None:
            return web.json_response(_model_object(state, kind, root + name, oid))
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


def add_routes(app: web.Application) -> None:
    """Register the generation and model routes."""
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id:.+}", model)
