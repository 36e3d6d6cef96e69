"""The HTTP server on loopback with real clients: generate by ref, bad input, OpenAI client, PEFT parity,
hot swap, notify hook, auth, metrics, client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mintvcs import porcelain
from mintvcs.errors import MintError
from mintvcs.serve.api_keys import ApiKeyFileError
from mintvcs.serve.app import BackgroundServer, ServerConfig, ServerError, create_app
from mintvcs.serve.http_metrics import one_two_five_buckets
from mintvcs.serve.refwatch import names_an_ancestor
from mintvcs.store import Repository
from tests.fixtures import make_peft_adapter
from tests.mintvcs.storekit import commit_with_manifest_files, count_reads, edit_blob_header
from tests.serve.http_kit import (
    TOKEN,
    commit_on,
    gen,
    metric,
    peft_greedy,
    request,
    serving_app,
    sse_events,
    variant,
)


# ---------------------------------------------------------------------------- generate
def test_health_and_generate_by_branch_tag_and_commit(
    server: BackgroundServer, repo: Repository
) -> None:
    status, _, body = request(server.url + "/health")
    assert status == 200 and body["status"] == "ok"
    main = repo.resolve("main")
    for spec, want in (
        ("main", main),
        ("product-b", repo.resolve("product-b")),
        ("prod", main),
        (main[:9], main),
        (main, main),
    ):
        status, headers, body = gen(
            server, prompt="Hello world", ref=spec, max_tokens=4, temperature=0
        )
        assert status == 200, body
        assert body["revision"] == want and headers["X-Mint-Revision"] == want
        assert body["ref"] == spec
        assert 1 <= body["usage"]["completion_tokens"] <= 4
        assert body["finish_reason"] in ("stop", "length")
    # main and product-b are different adapters: their greedy outputs differ.
    a = gen(
        server,
        prompt="The answer is",
        ref="main",
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )[2]
    b = gen(
        server,
        prompt="The answer is",
        ref="product-b",
        max_tokens=8,
        temperature=0,
        return_token_ids=True,
    )[2]
    assert a["token_ids"] != b["token_ids"]


def test_ref_tilde_and_old_revision_stay_reachable(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    first = repo.resolve("main")
    new = commit_on(repo, "main", adapters["a1"], "a1")
    status, _, body = gen(server, prompt="Hi", ref="main~1", max_tokens=2, temperature=0)
    assert status == 200 and body["revision"] == first
    status, _, body = gen(server, prompt="Hi", ref=first, max_tokens=2, temperature=0)
    assert status == 200 and body["revision"] == first
    status, _, body = gen(server, prompt="Hi", ref="main", max_tokens=2, temperature=0)
    assert body["revision"] == new


def test_seeded_sampling_is_reproducible(server: BackgroundServer) -> None:
    bodies = [
        gen(
            server,
            prompt="Hello",
            ref="product-b",
            max_tokens=12,
            temperature=1.3,
            top_p=0.9,
            top_k=50,
            seed=7,
            return_token_ids=True,
        )[2]
        for _ in range(2)
    ]
    assert bodies[0]["token_ids"] == bodies[1]["token_ids"]
    other = gen(
        server,
        prompt="Hello",
        ref="product-b",
        max_tokens=12,
        temperature=1.3,
        seed=8,
        return_token_ids=True,
    )[2]
    assert other["token_ids"] != bodies[0]["token_ids"]


def test_stop_string_ends_generation(server: BackgroundServer) -> None:
    full = gen(server, prompt="Hello", ref="main", max_tokens=20, temperature=0, ignore_eos=True)[
        2
    ]["text"]
    cut = next((i for i in range(1, len(full)) if full[i].isprintable() and full[i] != " "), None)
    if cut is None:
        pytest.skip("this seed's greedy text has no printable character to stop on")
    stop = full[cut]
    status, _, body = gen(
        server,
        prompt="Hello",
        ref="main",
        max_tokens=20,
        temperature=0,
        ignore_eos=True,
        stop=[stop],
    )
    assert status == 200
    assert body["finish_reason"] == "stop" and body["text"] == full[: full.index(stop)]


def test_generate_stream_format(server: BackgroundServer, repo: Repository) -> None:
    status, headers, text = gen(
        server,
        prompt="Hello world",
        ref="product-b",
        max_tokens=6,
        temperature=0,
        stream=True,
        ignore_eos=True,
    )
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    tokens = [json.loads(d) for e, d in events if e is None]
    name, data = events[-1]
    done = json.loads(data)
    assert name == "done" and len(tokens) == 6 and [t["index"] for t in tokens] == list(range(1, 7))
    assert done["revision"] == repo.resolve("product-b") == headers["X-Mint-Revision"]
    assert "".join(t["text"] for t in tokens) == done["text"]
    plain = gen(
        server, prompt="Hello world", ref="product-b", max_tokens=6, temperature=0, ignore_eos=True
    )[2]
    assert plain["text"] == done["text"] and plain["usage"] == done["usage"]


# ---------------------------------------------------------------------------- bad input
BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("invalid json", b"{not json", 400),
    ("json nested too deeply", b"[" * 100_000 + b"]" * 100_000, 400),
    ("an integer of 5000 digits", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", 400),
    ("empty body", b"", 400),
    ("whitespace body", b"  \n", 400),
    ("array body", b"[1, 2]", 400),
    ("missing prompt", b'{"ref": "main"}', 400),
    ("prompt not a string", b'{"prompt": 5}', 400),
    ("empty prompt", b'{"prompt": ""}', 400),
    ("ref not a string", b'{"prompt": "x", "ref": ["main"]}', 400),
    ("max_tokens a string", b'{"prompt": "x", "max_tokens": "3"}', 400),
    ("max_tokens a bool", b'{"prompt": "x", "max_tokens": true}', 400),
    ("max_tokens a float", b'{"prompt": "x", "max_tokens": 2.5}', 400),
    ("stream a string", b'{"prompt": "x", "stream": "yes"}', 400),
    ("max_tokens zero", b'{"prompt": "x", "max_tokens": 0}', 400),
    ("max_tokens negative", b'{"prompt": "x", "max_tokens": -5}', 400),
    ("max_tokens over the limit", b'{"prompt": "x", "max_tokens": 401}', 400),
    ("NaN temperature", b'{"prompt": "x", "temperature": NaN}', 400),
    ("infinite temperature", b'{"prompt": "x", "temperature": Infinity}', 400),
    ("negative temperature", b'{"prompt": "x", "temperature": -1}', 400),
    ("top_p zero", b'{"prompt": "x", "top_p": 0}', 400),
    ("stop not strings", b'{"prompt": "x", "stop": [1]}', 400),
    # An empty stop string would end every output at once; the list is bounded (16).
    ("empty stop string", b'{"prompt": "x", "stop": ["a", ""]}', 400),
    (
        "17 stop token ids",
        json.dumps({"prompt": "x", "stop_token_ids": list(range(17))}).encode(),
        400,
    ),
    (
        "17 stop strings",
        json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(17)]}).encode(),
        400,
    ),
    ("unknown ref", b'{"prompt": "x", "ref": "no-such-branch"}', 404),
    ("unknown commit id", b'{"prompt": "x", "ref": "' + b"0" * 40 + b'"}', 404),
    ("ref with ..", b'{"prompt": "x", "ref": "main..product-b"}', 400),
    ("ref with control char", b'{"prompt": "x", "ref": "ma\\u0007in"}', 400),
    ("ref with newline", b'{"prompt": "x", "ref": "main\\n"}', 400),
    ("empty ref", b'{"prompt": "x", "ref": ""}', 400),
    ("ref past the first commit", b'{"prompt": "x", "ref": "prod~5"}', 404),
    ("prompt over the size limit", json.dumps({"prompt": "x" * 2001}).encode(), 413),
]


@pytest.mark.parametrize(("case", "raw", "status"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_input_is_a_json_4xx(
    server: BackgroundServer, case: str, raw: bytes, status: int
) -> None:
    got, headers, body = request(server.url + "/generate", raw, method="POST")
    assert got == status, (case, body)
    assert headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and isinstance(body["error"], str) and body["error"]
    # The server is still up and serving.
    assert gen(server, prompt="ok", ref="main", max_tokens=1)[0] == 200


def test_bad_input_on_openai_routes_uses_openai_error_shape(server: BackgroundServer) -> None:
    status, _, body = request(server.url + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and "nope" in body["error"]["message"]
    status, _, body = request(
        server.url + "/v1/chat/completions", {"model": "main", "messages": []}
    )
    assert status == 400 and body["error"]["message"]
    status, _, body = request(
        server.url + "/v1/chat/completions",
        {"model": "main", "messages": [{"role": "wizard", "content": "x"}]},
    )
    assert status == 400
    status, _, body = request(
        server.url + "/v1/completions", {"model": "main", "prompt": "x", "n": 2, "best_of": 3}
    )
    assert status == 400 and "best_of" in body["error"]["message"]
    status, _, body = request(
        server.url + "/v1/completions", {"model": "main", "prompt": ["x", "y"], "n": 513}
    )
    assert status == 400 and "1026 choices" in body["error"]["message"]
    status, _, body = request(server.url + "/nope")
    assert status == 404 and "error" in body
    status, headers, body = request(server.url + "/generate", method="GET")
    assert status == 405 and "error" in body
    assert headers["Allow"] == "POST"  # RFC 9110: a 405 says which methods the resource takes


def test_prompt_longer_than_the_context_is_413(server: BackgroundServer) -> None:
    # Under the byte limit, over the 512-token context: every byte of this prompt is its own token.
    status, _, body = gen(server, prompt="\x01\x02" * 300, ref="main")
    assert status == 413 and "tokens" in body["error"]


def test_a_prompt_at_each_limit_is_measured_as_the_limit_says(server: BackgroundServer) -> None:
    # --max-prompt-bytes is the most a prompt may have: 2000 bytes pass the byte check (this
    # one is then too long in tokens), 2001 do not.
    status, _, body = gen(server, prompt="x" * 2000, ref="main")
    assert (status, body["reason"]) == (413, "prompt_too_long"), body
    status, _, body = gen(server, prompt="x" * 2001, ref="main")
    assert (status, body["reason"]) == (413, "prompt_too_large"), body
    status, _, body = request(server.url + "/tokenize", {"prompt": "x" * 2000})
    assert status == 200 and body["count"] == 2000, body
    # A prompt must leave the context room for one token: 511 of 512 do, 512 are refused
    # as too long (413 prompt_too_long, as past it), not as some other 400.
    for length, status in ((511, 200), (512, 413)):
        got, _, body = request(
            server.url + "/v1/completions",
            {"model": "main", "prompt": [5] * length, "max_tokens": 1},
        )
        assert got == status, (length, body)
    assert body["error"]["code"] == "prompt_too_long", body


def test_unsupported_lora_feature_is_422_naming_it(server: BackgroundServer) -> None:
    for _ in range(2):  # the refusal is remembered: the second answer comes from the failure cache
        status, _, body = gen(server, prompt="Hello", ref="dora", max_tokens=2)
        assert status == 422 and body["reason"] == "dora" and "DoRA" in body["error"]
    status, _, body = gen(server, prompt="Hello", ref="dora", max_tokens=2, stream=True)
    assert status == 422 and body["reason"] == "dora"
    assert gen(server, prompt="ok", ref="main", max_tokens=1)[0] == 200


def test_revision_for_another_base_is_422(
    tmp_path: Path, tiny_base: Path, other_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    foreign = make_peft_adapter(other_base, tmp_path / "foreign")
    other_repo = porcelain.init(tmp_path / "repo", str(other_base))
    porcelain.commit(
        other_repo, "for another base", source=foreign, verify=False, show_progress=False
    )
    config = ServerConfig(repo=tmp_path / "repo", base_model=tiny_base, port=0, max_model_len=128)
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"), BackgroundServer(config) as srv:
        status, _, body = request(srv.url + "/generate", {"prompt": "Hello", "ref": "main"})
        assert status == 422 and body["reason"] == "base_fingerprint", body
        assert request(srv.url + "/health")[0] == 200
    # The operator hears of it at start, not only from each refused request.
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("is not the base this repository was made for" in m for m in warned), warned


def test_a_repository_made_before_serves_on_its_base_resaved(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A repository that recorded the old digest of a base whose config had no head_dim
    serves its revisions on a bf16 copy transformers re-saved (which writes head_dim): the
    same model, no 422 and no 'not the base' warning."""
    import torch
    from transformers import AutoModelForCausalLM

    from mintvcs.base import read_base_model
    from tests.fixtures import build_base
    from tests.mintvcs.test_base_model import _old_fingerprint, _without_head_dim

    original = _without_head_dim(build_base(tmp_path / "orig", "mistral"))
    resaved = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.bfloat16)
    model.save_pretrained(resaved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(original / name, resaved / name)
    # As `init` recorded it before the fingerprint was normalised.
    old = dataclasses.replace(read_base_model(original), fingerprint=_old_fingerprint(original))
    repo = Repository.init(tmp_path / "repo", old)
    adapter = make_peft_adapter(original, tmp_path / "adapter")
    porcelain.commit(repo, "one", source=adapter, show_progress=False)
    repo.close()
    for base in (original, resaved):
        config = ServerConfig(repo=tmp_path / "repo", base_model=base, port=0, max_model_len=64)
        with (
            caplog.at_level(logging.WARNING, logger="mintvcs.serve"),
            BackgroundServer(config) as srv,
        ):
            status, _, body = request(
                srv.url + "/generate", {"prompt": "Hello", "ref": "main", "max_tokens": 2}
            )
            assert status == 200, body
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert not any("is not the base this repository was made for" in m for m in warned), warned


# ---------------------------------------------------------------------------- auth and admin
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/refs/notify", {"ref": "main"}),
        ("POST", "/v1/adapters/warm", {"ref": "main"}),
        ("GET", "/v1/adapters", None),
    ],
)
def test_admin_endpoints_need_the_token(
    server: BackgroundServer, method: str, path: str, body: Any
) -> None:
    url = server.url + path
    status, headers, _ = request(url, body, method=method)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert request(url, body, method=method, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(url, body, method=method, headers={"Authorization": "Basic " + TOKEN})[0] == 401
    status, _, answer = request(
        url, body, method=method, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200, answer


def test_a_token_that_is_not_utf8_is_401_not_500(server: BackgroundServer) -> None:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        conn.putrequest("GET", "/v1/adapters")
        conn.putheader("Authorization", b"Bearer \xff\xfe")  # raw bytes, as any client may send
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 401, response.read()
        assert json.loads(response.read())["error"]["code"] == "wrong_token"
    finally:
        conn.close()


def test_api_key_scope_all_guards_every_endpoint_but_health(
    repo: Repository, tiny_base: Path, tmp_path: Path
) -> None:
    key = tmp_path / "token"
    key.write_text(TOKEN)
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=64,
        api_key_file=key,
        api_key_scope="all",
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with BackgroundServer(config) as srv:
        # Probes need no credentials; what the answer tells beyond the status (the base
        # model's path on this machine among it) needs the token.
        status, _, health = request(srv.url + "/health")
        assert (status, health) == (200, {"status": "ok"})
        wrong = {"Authorization": "Bearer not-the-token"}
        assert request(srv.url + "/health", headers=wrong)[2] == {"status": "ok"}
        status, _, health = request(srv.url + "/health", headers=auth)
        assert status == 200 and health["base_model"] == str(tiny_base), health
        for path, body in (
            ("/generate", {"prompt": "x", "max_tokens": 1}),
            ("/v1/completions", {"model": "main", "prompt": "x", "max_tokens": 1}),
            ("/v1/models", None),
            ("/metrics", None),
        ):
            status, _, answer = request(srv.url + path, body)
            assert status == 401, (path, answer)
            assert request(srv.url + path, body, headers=auth)[0] == 200, path


def test_failed_load_under_api_key_scope_all_names_its_error_to_token_holders_only(
    repo: Repository, tiny_base: Path, tmp_path: Path
) -> None:
    def broken_engine(config: ServerConfig) -> Any:
        raise MintError(f"cannot read {config.base_model / 'model.safetensors'}")

    key = tmp_path / "token"
    key.write_text(TOKEN)
    srv = BackgroundServer(
        ServerConfig(
            repo=repo.git_dir,
            base_model=tiny_base,
            port=0,
            api_key_file=key,
            api_key_scope="all",
        ),
        engine_factory=broken_engine,
    )
    srv.start(wait=False)
    try:
        deadline = time.monotonic() + 30
        while request(srv.url + "/health")[2]["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        status, headers, body = request(srv.url + "/health")
        assert (status, body, headers["Retry-After"]) == (503, {"status": "failed"}, "1")
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status, _, body = request(srv.url + "/health", headers=auth)
        assert status == 503 and str(tiny_base) in body["error"], body
    finally:
        srv.stop()


def test_api_key_file_rotates_without_a_restart(
    repo: Repository,
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every line is a token; the file is re-read when it changes; an emptied file keeps the old ones."""
    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.05)
    key = tmp_path / "token"
    key.write_text("old-token\n")
    key.chmod(0o600)
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, api_key_file=key)

    def status(srv: BackgroundServer, token: str) -> int:
        return request(srv.url + "/v1/adapters", headers={"Authorization": f"Bearer {token}"})[0]

    def eventually(srv: BackgroundServer, token: str, wanted: int) -> None:
        deadline = time.monotonic() + 10
        while status(srv, token) != wanted:
            assert time.monotonic() < deadline, (token, wanted)
            time.sleep(0.02)

    def logged(srv: BackgroundServer, text: str) -> None:
        """Ask with the token until the server's log says `text` (it reads the file as asked)."""
        deadline = time.monotonic() + 10
        while text not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            status(srv, "new-token")
            time.sleep(0.02)

    with caplog.at_level(logging.INFO, logger="mintvcs.serve"), BackgroundServer(config) as srv:
        assert (status(srv, "old-token"), status(srv, "new-token")) == (200, 401)
        key.write_text("# rotation: both until the clients move\nold-token\n\n  new-token  \n")
        eventually(srv, "new-token", 200)
        assert status(srv, "old-token") == 200
        key.write_text("new-token\n")
        eventually(srv, "old-token", 401)
        key.write_text("")  # emptied by mistake: keep what worked rather than lock everyone out
        logged(srv, "keeping the 1 token(s) read before")
        assert status(srv, "new-token") == 200
        assert "re-read: 2 token(s)" in caplog.text
        key.unlink()  # gone: the same, with its own warning
        logged(srv, "cannot read --api-key-file")
        assert status(srv, "new-token") == 200
    key.write_text("# no token here\n")
    with pytest.raises(ApiKeyFileError, match="holds no token"):
        api_keys.ApiKeys(key)


@pytest.fixture
def key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 0600 token file holding "old", re-read at every refresh()."""
    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.0)
    key = tmp_path / "keys"
    key.write_text("old\n")
    key.chmod(0o600)
    return key


def test_a_key_file_change_is_taken_once_two_reads_agree(key_file: Path) -> None:
    """A file caught half written is not taken: a new content must read the same twice."""
    from mintvcs.serve.api_keys import ApiKeys

    keys = ApiKeys(key_file)
    key_file.write_text("ol\n")  # a write caught midway
    assert keys.refresh() == (b"old",)
    key_file.write_text("new\n")
    assert keys.refresh() == (b"old",)  # read once: not yet
    assert keys.refresh() == (b"new",)


@pytest.mark.parametrize("mode", [0o640, 0o620, 0o604])
def test_any_group_or_other_permission_on_the_key_file_is_a_warning(
    key_file: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    """docs/http.md: any group or other permission is a warning (chmod 600)."""
    from mintvcs.serve.api_keys import ApiKeys

    key_file.chmod(mode)
    with caplog.at_level(logging.WARNING, "mintvcs.serve"):
        ApiKeys(key_file)
    assert "chmod 600" in caplog.text


def test_a_key_file_broken_again_after_a_fix_is_told_again(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each break of the key file is logged, not only the first."""
    from mintvcs.serve.api_keys import ApiKeys

    keys = ApiKeys(key_file)
    with caplog.at_level(logging.WARNING, "mintvcs.serve"):
        for text in ("# none\n", "old\n", "# none\n"):
            key_file.write_text(text)
            keys.refresh()
    assert caplog.text.count("holds no token") == 2


def test_a_key_file_rotated_open_to_others_is_a_warning(
    key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rotation renaming a 0644 file over the key file is warned about, as at start."""
    from mintvcs.serve.api_keys import ApiKeys

    keys = ApiKeys(key_file)
    new = key_file.with_name("keys.new")
    new.write_text("new\n")
    new.chmod(0o644)
    os.replace(new, key_file)
    with caplog.at_level(logging.WARNING, "mintvcs.serve"):
        keys.refresh()
        assert keys.refresh() == (b"new",)
    assert "chmod 600" in caplog.text


def test_a_token_that_is_not_utf8_is_matched_byte_for_byte(key_file: Path) -> None:
    """A Latin-1 token file is read as bytes, not refused with a UnicodeDecodeError."""
    from mintvcs.serve.api_keys import ApiKeys

    key_file.write_bytes(b"caf\xe9\n")
    keys = ApiKeys(key_file)
    assert keys.accepts(b"caf\xe9") and not keys.accepts(b"caf")


def _hang_reads(
    keys: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[threading.Event, threading.Event, Callable[..., bytes | None]]:
    """Make `keys`' file reads wait until the second event is set (the first is set as one
    starts): no hung mount can be made here, and a read that waits stands for one. Patched on
    this instance alone: another test's server may be running in this process. Returns the
    events and the real read."""
    entered, mount_back = threading.Event(), threading.Event()
    read_bytes = keys._read_bytes

    def hung_read(at_start: bool = False) -> bytes | None:
        entered.set()
        mount_back.wait(30)
        return read_bytes(at_start)

    monkeypatch.setattr(keys, "_read_bytes", hung_read)
    return entered, mount_back, read_bytes


def test_a_key_file_that_hangs_does_not_stall_the_server(
    repo: Repository,
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The token file is re-read off the event loop: a read that blocks (a hung network mount)
    leaves every request answered with the tokens read before, and is told once it has lasted
    several intervals, since no rotation is taken meanwhile."""
    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.05)
    key = tmp_path / "token"
    key.write_text("the-token\n")
    key.chmod(0o600)
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, api_key_file=key)
    auth = {"Authorization": "Bearer the-token"}

    with caplog.at_level(logging.INFO, logger="mintvcs.serve"), BackgroundServer(config) as srv:
        # Re-read on a timer: a new token works on its first request, however sparse the traffic.
        key.write_text("the-token\nnew-token\n")
        time.sleep(0.5)
        new = {"Authorization": "Bearer new-token"}
        assert request(srv.url + "/v1/adapters", headers=new, timeout=5)[0] == 200
        keys = srv.state.api_keys
        assert keys is not None
        _entered, mount_back, _read_bytes = _hang_reads(keys, monkeypatch)
        try:
            time.sleep(0.2)
            for _ in range(20):  # more than the default executor's threads
                assert request(srv.url + "/v1/adapters", headers=auth, timeout=5)[0] == 200
                assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 200
                time.sleep(0.02)
            told = [r.getMessage() for r in caplog.records if str(key) in r.getMessage()]
            assert len([m for m in told if "has not ended after" in m]) == 1, told  # once per read
        finally:
            mount_back.set()
        deadline = time.monotonic() + 10
        while not any(f"{key} ended after" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)


def test_a_key_file_that_is_a_fifo_for_a_while_does_not_stop_later_rotations(
    repo: Repository,
    tiny_base: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A FIFO at the key file's path is not a token file: it is warned about and left unread
    (opening it would wait for a writer for ever, and no later rotation would be read), and the
    regular file renamed over it next is taken."""
    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.05)
    key = tmp_path / "token"
    key.write_text("old-token\n")
    key.chmod(0o600)
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, api_key_file=key)

    def status(srv: BackgroundServer, token: str) -> int:
        return request(
            srv.url + "/v1/adapters", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )[0]

    with caplog.at_level(logging.INFO, logger="mintvcs.serve"), BackgroundServer(config) as srv:
        key.unlink()
        os.mkfifo(key, 0o600)
        deadline = time.monotonic() + 10
        while "is not a regular file" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            assert (status(srv, "old-token"), status(srv, "new-token")) == (200, 401)
            time.sleep(0.02)
        time.sleep(0.3)  # several reads of the FIFO: one warning all the same
        assert caplog.text.count("is not a regular file") == 1, caplog.text
        fresh = tmp_path / "token.new"
        fresh.write_text("new-token\n")
        fresh.chmod(0o600)
        os.replace(fresh, key)
        deadline = time.monotonic() + 3
        while (status(srv, "old-token"), status(srv, "new-token")) != (401, 200):
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.02)
        assert "re-read: 1 token(s)" in caplog.text


def test_a_key_file_given_as_a_pipe_is_read_once_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`--api-key-file <(pass show ...)`: a pipe, read to its end at start (its writer may
    still be writing), its tokens kept and its later reads quiet; one that never ends within
    PIPE_TIMEOUT is refused rather than waited for."""
    from mintvcs.serve import api_keys
    from mintvcs.serve.api_keys import ApiKeyFileError, ApiKeys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.0)
    monkeypatch.setattr(api_keys, "PIPE_TIMEOUT", 2.0, raising=False)
    read_end, write_end = os.pipe()  # what bash's process substitution passes: /dev/fd/N
    try:
        os.write(write_end, b"piped-1\n")

        def finish() -> None:
            time.sleep(0.2)
            os.write(write_end, b"piped-2\n")
            os.close(write_end)

        writer = threading.Thread(target=finish)
        with caplog.at_level(logging.INFO, "mintvcs.serve"):
            writer.start()
            path = f"/dev/fd/{read_end}"
            keys = ApiKeys(Path(path))
            writer.join()
            assert keys.accepts(b"piped-1") and keys.accepts(b"piped-2")
            # Of this file alone: another test's server may still log in this process.
            [told] = [m for m in caplog.messages if path in m]
            assert "read once, at start, and cannot be rotated" in told
            assert keys.refresh() == (b"piped-1", b"piped-2")  # the pipe is spent: kept
            assert keys.refresh() == (b"piped-1", b"piped-2")
            assert [m for m in caplog.messages if path in m] == [told]  # no warning at each read
    finally:
        os.close(read_end)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)

    def fill() -> None:
        time.sleep(0.2)  # opened by the reader first: no writer yet
        with open(fifo, "wb") as out:
            out.write(b"fifo-token\n")

    writer = threading.Thread(target=fill)
    writer.start()
    assert ApiKeys(fifo).accepts(b"fifo-token")
    writer.join()
    started = time.monotonic()
    with pytest.raises(ApiKeyFileError, match="is a pipe that gave no end within 2 s"):
        ApiKeys(fifo)  # nobody writes
    assert time.monotonic() - started < 10


def test_a_stalled_key_file_read_is_told_once_and_its_end_too(
    key_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A read under way for STALLED_INTERVALS intervals is warned about once; the change made
    meanwhile is taken after it ends."""
    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.01)
    keys = api_keys.ApiKeys(key_file)
    entered, mount_back, read_bytes = _hang_reads(keys, monkeypatch)
    time.sleep(0.02)
    reader = threading.Thread(target=keys.refresh, daemon=True)
    with caplog.at_level(logging.INFO, "mintvcs.serve"):
        reader.start()
        assert entered.wait(5)
        keys.warn_if_stalled()
        assert "has not ended" not in caplog.text  # not yet several intervals
        time.sleep(api_keys.STALLED_INTERVALS * 0.01 + 0.02)
        keys.warn_if_stalled()
        keys.warn_if_stalled()
        assert keys.refresh() == (b"old",)  # a second read does not queue behind it
        told = [r.getMessage() for r in caplog.records if str(key_file) in r.getMessage()]
        assert len([m for m in told if "has not ended after" in m]) == 1, told
        key_file.write_text("new\n")
        mount_back.set()
        reader.join(5)
        assert any(f"{key_file} ended after" in r.getMessage() for r in caplog.records)
        monkeypatch.setattr(keys, "_read_bytes", read_bytes)
        time.sleep(0.02)
        keys.refresh()  # the hung read saw "new" once; now twice
        assert keys.refresh() == (b"new",)


def test_a_stall_told_as_its_read_ends_is_told_ended_then_and_only_then(
    key_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The event loop's stall check and the read thread's end race: the read ending between the
    check's look at the read under way and its mark of the stall as told must still log its
    end, at once, and leave no mark for the next read (a bogus "ended after 0 s")."""
    import types

    from mintvcs.serve import api_keys

    monkeypatch.setattr(api_keys, "CHECK_INTERVAL", 0.01)
    keys = api_keys.ApiKeys(key_file)
    entered, mount_back, read_bytes = _hang_reads(keys, monkeypatch)
    time.sleep(0.02)
    reader = threading.Thread(target=keys.refresh, daemon=True)
    real_monotonic = time.monotonic
    armed = threading.Event()

    def monotonic() -> float:
        # The stall check asks the time between its look and its mark: the read ends there.
        if armed.is_set() and threading.current_thread() is threading.main_thread():
            armed.clear()
            mount_back.set()
            reader.join(0.5)  # the read's end waits for the check (or ends at once, unfixed)
        return real_monotonic()

    monkeypatch.setattr(api_keys, "time", types.SimpleNamespace(monotonic=monotonic))
    with caplog.at_level(logging.INFO, "mintvcs.serve"):
        reader.start()
        assert entered.wait(5)
        time.sleep(api_keys.STALLED_INTERVALS * 0.01 + 0.02)
        armed.set()
        keys.warn_if_stalled()
        reader.join(5)
        ended = [m for m in caplog.messages if f"{key_file} ended after" in m]
        assert len(ended) == 1, caplog.text
        monkeypatch.setattr(keys, "_read_bytes", read_bytes)
        time.sleep(0.02)
        keys.refresh()
        ended = [m for m in caplog.messages if f"{key_file} ended after" in m]
        assert len(ended) == 1, caplog.text


def test_unpin_by_ref_releases_what_it_pinned_after_the_ref_moved(
    server: BackgroundServer, repo: Repository
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    old, new = repo.resolve("main"), repo.resolve("product-b")
    porcelain.branch_create(repo, "pinme", old)
    try:
        warm = {"ref": "pinme", "pin": True}
        body = request(server.url + "/v1/adapters/warm", warm, headers=auth)[2]
        assert body["revision"] == old and body["pinned"] is True, body
        porcelain.branch_create(repo, "pinme", new, force=True)
        status, _, body = request(server.url + "/v1/adapters/unpin", {"ref": "pinme"}, headers=auth)
        # It unpinned the revision pinme names now (never pinned), and old stayed pinned for good.
        assert status == 200 and body["revision"] == new and body["unpinned"] == [old], body
        assert old not in request(server.url + "/v1/adapters", headers=auth)[2]["pinned"]
    finally:
        porcelain.branch_delete(repo, "pinme", force=True)


def test_pins_by_many_spellings_are_remembered_within_a_bound(server: BackgroundServer) -> None:
    from mintvcs.serve.http_admin import MAX_PIN_SPECS

    auth = {"Authorization": f"Bearer {TOKEN}"}
    spellings = ["main" + "~0" * n for n in range(MAX_PIN_SPECS + 40)]
    try:
        for spec in spellings:
            status, _, body = request(
                server.url + "/v1/adapters/warm", {"ref": spec, "pin": True}, headers=auth
            )
            assert status == 200 and body["pinned"], body
        # One commit pinned under ever more names: each spelling was kept until unpinned by it.
        assert len(server.state.pins_by_spec) == MAX_PIN_SPECS
        assert list(server.state.pins_by_spec)[-1] == spellings[-1]
    finally:
        status, _, body = request(
            server.url + "/v1/adapters/unpin", {"ref": spellings[-1]}, headers=auth
        )
    assert status == 200 and body["unpinned"], body
    engine = server.state.engine
    assert engine is not None and engine.residency.pinned() == []
    # Spellings whose revision is no longer pinned are forgotten at the next pin.
    warm_b = {"ref": "product-b", "pin": True}
    status, _, body = request(server.url + "/v1/adapters/warm", warm_b, headers=auth)
    assert status == 200, body
    assert server.state.pins_by_spec == {"product-b": body["revision"]}
    assert request(server.url + "/v1/adapters/unpin", {"ref": "product-b"}, headers=auth)[0] == 200


def test_warm_pin_and_residency(server: BackgroundServer, repo: Repository) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    status, _, body = request(
        server.url + "/v1/adapters/warm", {"ref": "product-b", "pin": True}, headers=auth
    )
    assert (
        status == 200 and body["revision"] == repo.resolve("product-b") and body["slot"] is not None
    )
    status, _, body = request(server.url + "/v1/adapters", headers=auth)
    slots = {s["revision"]: s for s in body["slots"]}
    assert slots[repo.resolve("product-b")]["pinned"] is True
    assert request(server.url + "/v1/adapters/unpin", {"ref": "product-b"}, headers=auth)[0] == 200
    status, _, body = request(server.url + "/v1/adapters/warm", {"ref": "dora"}, headers=auth)
    assert status == 422 and body["error"]["code"] == "dora"
    both = {"ref": "main", "revision": repo.resolve("product-b")}
    status, _, body = request(server.url + "/v1/adapters/warm", both, headers=auth)
    assert status == 400 and "not both" in str(body), body


def test_models_lists_branches_and_tags(server: BackgroundServer, repo: Repository) -> None:
    status, _, body = request(server.url + "/v1/models")
    assert status == 200
    got = {m["id"]: (m["kind"], m["revision"]) for m in body["data"]}
    assert got["main"] == ("branch", repo.resolve("main"))
    assert got["product-b"] == ("branch", repo.resolve("product-b"))
    assert got["prod"] == ("tag", repo.resolve("prod"))
    status, _, body = request(server.url + "/v1/models?prefix=prod")
    assert [m["id"] for m in body["data"]] == ["product-b", "prod"]


def test_models_reads_each_listed_commit_once(
    server: BackgroundServer, repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each listed ref's object was read three times (peeled to check its type, peeled again,
    # parsed for its date): /v1/models?limit=10000 took 4.6 s on 21k refs.
    store = server.state.repo
    request(server.url + "/v1/models")  # commit dates are remembered from here on
    reads = count_reads(store, monkeypatch)
    listed = request(server.url + "/v1/models")[2]["data"]
    revisions = [m["revision"] for m in listed if m["object"] == "model" and "revision" in m]
    assert len(revisions) >= 3 and len(reads) == len(revisions), (reads, revisions)


def test_notify_for_an_annotated_tag_takes_the_tag_object_as_its_value(
    server: BackgroundServer, repo: Repository
) -> None:
    value = porcelain.tag_create(repo, "annotated", "main", message="release")
    try:
        body = request(
            server.url + "/v1/refs/notify",
            {"ref": "refs/tags/annotated", "new": value},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )[2]
        assert body["revision"] == repo.resolve("main") and body["warnings"] == [], body
    finally:
        porcelain.tag_delete(repo, "annotated")


def test_a_branch_a_tag_shadows_is_listed_by_its_full_name(
    server: BackgroundServer, repo: Repository
) -> None:
    porcelain.branch_create(repo, "twin", "product-b")
    porcelain.tag_create(repo, "twin", "main")
    try:
        listed = request(server.url + "/v1/models?prefix=twin")[2]["data"]
        assert [(m["id"], m["kind"]) for m in listed] == [
            ("refs/heads/twin", "branch"),
            ("twin", "tag"),
        ]
        # Every id listed serves what it lists, and retrieving it gives what it lists.
        for model in listed:
            assert request(server.url + "/v1/models/" + model["id"])[2] == model
            got = request(
                server.url + "/v1/completions",
                {"model": model["id"], "prompt": "Hi", "max_tokens": 1},
            )
            assert got[0] == 200 and got[1]["X-Mint-Revision"] == model["revision"], got
    finally:
        porcelain.tag_delete(repo, "twin")
        porcelain.branch_delete(repo, "twin", force=True)


def test_a_renamed_branch_is_served_by_its_new_name_only(
    server: BackgroundServer, repo: Repository
) -> None:
    # `branch -m`: the watcher's cached resolution of the old name must not outlive it.
    porcelain.branch_create(repo, "before", "product-b")
    want = repo.resolve("product-b")
    try:
        assert gen(server, prompt="Hi", ref="before", max_tokens=1)[2]["revision"] == want
        porcelain.branch_rename(repo, "before", "after")
        status, _, body = gen(server, prompt="Hi", ref="before", max_tokens=1)
        assert status == 404, body
        status, _, body = gen(server, prompt="Hi", ref="after", max_tokens=1)
        assert status == 200 and body["revision"] == want, body
    finally:
        for name in ("before", "after"):
            with contextlib.suppress(MintError):
                porcelain.branch_delete(repo, name, force=True)


def test_metrics_count_requests_tokens_and_slots(server: BackgroundServer) -> None:
    gen(server, prompt="Hello", ref="product-b", max_tokens=3, ignore_eos=True)
    gen(server, prompt="Hello", ref="no-such-ref", max_tokens=3)
    status, headers, text = request(server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    lines = dict(
        line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )
    assert (
        float(lines['mint_requests_total{ref="product-b",endpoint="/generate",status="200"}']) >= 1
    )
    assert (
        float(lines['mint_requests_total{ref="(unresolved)",endpoint="/generate",status="404"}'])
        >= 1
    )
    assert float(lines['mint_tokens_total{ref="product-b",kind="completion",status="200"}']) >= 3
    assert float(lines['mint_tokens_total{ref="product-b",kind="prompt",status="200"}']) >= 1
    for name in (
        "mint_slot_hits_total",
        "mint_slot_misses_total",
        "mint_evictions_total",
        "mint_batch_size",
        "mint_queue_depth",
        "mint_kv_slots_free",
        "mint_prefilling",
        "mint_adapter_load_seconds_count",
    ):
        assert name in lines, name
    assert float(lines["mint_prefill_tokens_total"]) > 0
    assert float(lines["mint_adapter_load_seconds_count"]) >= 1
    assert float(lines['mint_adapter_load_seconds_bucket{le="+Inf"}']) == float(
        lines["mint_adapter_load_seconds_count"]
    )
    # Latency of generation requests: the 200 above counts, the 404 does not reach the engine.
    first, total = "mint_time_to_first_token_seconds", "mint_e2e_request_latency_seconds"
    assert float(lines[f"{first}_count"]) >= 1 and float(lines[f"{total}_count"]) >= 1
    assert float(lines[f"{first}_sum"]) > 0 and float(lines[f"{total}_sum"]) > 0
    # A CPU generation of minutes, or a queue behind one, still lands in a finite bucket.
    for name, reach in ((first, 1000.0), (total, 3600.0)):
        bounds = [
            float(key.split('le="')[1].rstrip('"}'))
            for key in lines
            if key.startswith(f"{name}_bucket") and "+Inf" not in key
        ]
        assert max(bounds) >= reach and min(bounds) <= 0.01, (name, bounds)


def test_a_warm_the_closing_engine_never_made_is_a_503_as_the_closing_is() -> None:
    from mintvcs.serve.app import status_for
    from mintvcs.serve.slots import ResidencyClosed, ResidencyError

    # 409 is a pin conflict or a full host cache: the client's to fix, not a stopping server.
    assert status_for(ResidencyClosed("the engine was closed")) == 503
    assert status_for(ResidencyError("every slot is pinned")) == 409


def test_a_warm_while_the_engine_closes_is_a_503(
    repo: Repository, tiny_base: Path, tmp_path: Path
) -> None:
    # It was a 409 (a plain ResidencyError) once the residency had begun closing.
    key = tmp_path / "token"
    key.write_text(TOKEN + "\n")
    key.chmod(0o600)
    config = ServerConfig(
        repo=repo.git_dir, base_model=tiny_base, port=0, max_loras=2, api_key_file=key
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with BackgroundServer(config) as srv:
        srv.state.engine.residency.close()  # where closing stands once the step loop stopped
        status, headers, body = request(
            srv.url + "/v1/adapters/warm", {"ref": "main"}, headers=auth
        )
        assert status == 503, body
        assert "Retry-After" in headers


def test_latency_buckets_step_one_two_five_between_their_ends() -> None:
    assert one_two_five_buckets(0.001, 0.05) == (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
    assert one_two_five_buckets(1.0, 30.0) == (1.0, 2.0, 5.0, 10.0, 20.0)


# ---------------------------------------------------------------------------- ref moves
def test_hot_swap_within_one_second(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    before = gen(server, prompt="Hi", ref="main", max_tokens=1)[2]["revision"]
    new = commit_on(repo, "main", adapters["a2"], "a2")
    assert new != before
    committed = time.monotonic()
    while True:
        body = gen(server, prompt="Hi", ref="main", max_tokens=1)[2]
        if body["revision"] == new:
            break
        assert time.monotonic() - committed < 1.0, (
            "main moved but requests still get the old revision"
        )
    assert time.monotonic() - committed < 1.0


def test_watcher_prefetches_a_moved_ref(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    gen(server, prompt="Hi", ref="main", max_tokens=1)  # main is in use
    new = commit_on(
        repo, "main", variant(adapters["a"], adapters["a"].parent / "a-prefetch", 0.5), "prefetched"
    )
    deadline = time.monotonic() + 2.0
    engine = server.state.engine
    assert engine is not None
    while engine.residency.slot_of(new) is None:
        assert time.monotonic() < deadline, "the watcher did not prefetch the new revision of main"
        time.sleep(0.02)


def test_in_flight_request_keeps_its_revision(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    async def run() -> tuple[dict[str, Any], str, str]:
        import aiohttp

        body = {
            "prompt": "Hi",
            "ref": "main",
            "max_tokens": 300,
            "stream": True,
            "ignore_eos": True,
        }
        async with (
            aiohttp.ClientSession() as session,
            session.post(server.url + "/generate", json=body) as resp,
        ):
            old = resp.headers["X-Mint-Revision"]
            await resp.content.readline()
            new = await asyncio.to_thread(
                commit_on, repo, "main", adapters["a3"], "a3 while streaming"
            )
            text = (await resp.read()).decode()
        done = json.loads(sse_events(text)[-1][1])
        return done, old, new

    done, old, new = asyncio.run(run())
    assert done["revision"] == old != new
    assert done["usage"]["completion_tokens"] == 300
    assert gen(server, prompt="Hi", ref="main", max_tokens=1)[2]["revision"] == new


def test_ref_update_hook_notifies_the_server(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path], tmp_path: Path
) -> None:
    hook = repo.git_dir / "hooks" / "ref-update"
    assert (repo.git_dir / "hooks" / "ref-update.sample").is_file(), "init installs the sample"
    shutil.copyfile(repo.git_dir / "hooks" / "ref-update.sample", hook)
    hook.chmod(0o755)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = repo.git_dir / "config"
    original = config.read_text()
    config.write_text(
        original + f'[mint "notify"]\n\turl = {server.url}\n\ttoken-file = {token_file}\n'
    )

    def moves() -> float:
        return metric(server, 'mint_ref_moves_total{ref="main"}')

    try:
        gen(server, prompt="Hi", ref="main", max_tokens=1)
        before = moves()
        new = porcelain.commit(
            repo, "notified", source=adapters["a1"], verify=True, show_progress=False
        ).commit
        # Counted once, whether the hook's notify or the watcher saw the move first.
        assert moves() == before + 1
        assert gen(server, prompt="Hi", ref="main", max_tokens=1)[2]["revision"] == new
        time.sleep(0.4)  # the watcher has polled since: still one move
        assert moves() == before + 1
        porcelain.branch_create(repo, "short-lived", "main")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            porcelain.branch_delete(repo, "short-lived")
        assert f"{server.url}: refs/heads/short-lived -> (deleted)" in err.getvalue(), (
            err.getvalue()
        )
    finally:
        hook.unlink()
        config.write_text(original)


def test_ref_update_hook_notifies_servers_at_once_and_reports_each(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path], tmp_path: Path
) -> None:
    # A server that accepts but never answers, and one that answers a byte every half second:
    # the commit used to wait 2 s for each in turn (and for ever for the second: a socket
    # timeout bounds each read, not the answer), and the live server's "notified" line was
    # dropped once another one failed.
    import socket
    import threading

    hook = repo.git_dir / "hooks" / "ref-update"
    shutil.copyfile(repo.git_dir / "hooks" / "ref-update.sample", hook)
    hook.chmod(0o755)
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]

    def drip(listener: socket.socket) -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
                for _ in range(100):
                    time.sleep(0.5)
                    conn.sendall(b" ")

    threading.Thread(target=drip, args=(silent[1],), daemon=True).start()
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in silent] + [server.url]
    config = repo.git_dir / "config"
    original = config.read_text()
    token_file = tmp_path / "token"
    token_file.write_text(
        f"# the server's --api-key-file: its first token is sent\n\n{TOKEN}\nlater\n"
    )
    config.write_text(
        original
        + f'[mint "notify"]\n\ttoken-file = {token_file}\n'
        + "".join(f"\turl = {u}\n" for u in urls)
    )
    err = io.StringIO()
    try:
        started = time.monotonic()
        with contextlib.redirect_stderr(err):
            porcelain.commit(repo, "twice", source=adapters["a2"], verify=True, show_progress=False)
        elapsed = time.monotonic() - started
    finally:
        hook.unlink()
        config.write_text(original)
        for s in silent:
            s.close()
    text = err.getvalue()
    failed = [
        line for line in text.splitlines() if "cannot notify" in line or "did not answer" in line
    ]
    assert len(failed) == 2 and f"notified {server.url}" in text, text
    assert elapsed < 3.5, f"the hook waited past its 2 s for all servers ({elapsed:.1f} s)"


def test_notify_without_token_configured_is_open_and_refreshes(server: BackgroundServer) -> None:
    status, _, body = request(
        server.url + "/v1/refs/notify",
        {"ref": "main..x"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 400
    status, _, body = request(
        server.url + "/v1/refs/notify",
        b"",
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200 and body["ref"] is None
    # A hook whose "new" is stale is told so apart from the specs it refreshed.
    status, _, body = request(
        server.url + "/v1/refs/notify",
        {"ref": "main", "new": "0" * 40},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 200 and body["revision"] is not None
    assert len(body["warnings"]) == 1 and "not 000000000000" in body["warnings"][0]
    assert all(set(item) == {"spec", "revision"} for item in body["refreshed"])
    # A ref the server's repository lacks is said so (a hook pointed at the wrong server).
    auth = {"Authorization": f"Bearer {TOKEN}"}
    body = request(server.url + "/v1/refs/notify", {"ref": "refs/heads/nowhere"}, headers=auth)[2]
    assert body["revision"] is None and "names no revision" in body["warnings"][0]
    # A deletion the hook reports is no surprise: no warning.
    deleted = {"ref": "refs/heads/nowhere", "old": "1" * 40, "new": "0" * 40}
    status, _, body = request(server.url + "/v1/refs/notify", deleted, headers=auth)
    assert status == 200 and body["revision"] is None and body["warnings"] == [], body


# ---------------------------------------------------------------------------- disconnects
@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not streaming"])
def test_client_disconnect_cancels_and_frees_the_slot(
    server: BackgroundServer, stream: bool
) -> None:
    engine = server.state.engine
    assert engine is not None
    cancelled = engine.stats()["requests_cancelled"]

    async def run() -> None:
        import aiohttp

        body = {
            "prompt": "Hi",
            "ref": "product-b",
            "max_tokens": 400,
            "stream": stream,
            "ignore_eos": True,
        }
        async with aiohttp.ClientSession() as session:
            if stream:
                resp = await session.post(server.url + "/generate", json=body)
                assert resp.status == 200
                await resp.content.readline()
                resp.close()  # drop the connection mid-stream
                return
            # No byte comes back before the end: drop the connection once it is decoding.
            request = asyncio.ensure_future(session.post(server.url + "/generate", json=body))
            while engine.stats()["running"] == 0:
                await asyncio.sleep(0.01)
            request.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await request

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while True:
        stats = engine.stats()
        busy = [s for s in engine.residency_snapshot()["slots"] if s["refs"]]
        if stats["requests_cancelled"] > cancelled and stats["running"] == 0 and not busy:
            break
        assert time.monotonic() < deadline, (stats, busy)
        time.sleep(0.02)
    assert stats["kv_slots_free"] == engine.config.max_batch_size
    assert stats["generated_tokens"] >= 1
    # Its tokens count under the status it ended with, as its request does.
    series = 'mint_tokens_total{ref="product-b",kind="prompt",status="499"}'
    while series not in request(server.url + "/metrics")[2]:
        assert time.monotonic() < deadline + 5, "no prompt tokens counted under 499"
        time.sleep(0.02)


def test_a_client_that_half_closes_after_its_request_gets_no_answer_and_costs_nothing(
    server: BackgroundServer,
) -> None:
    import socket
    from urllib.parse import urlsplit

    engine = server.state.engine
    assert engine is not None
    answered = 'mint_requests_total{ref="product-b",endpoint="/generate",status="200"}'
    before = metric(server, answered)
    body = json.dumps(
        {"prompt": "Hi", "ref": "product-b", "max_tokens": 400, "ignore_eos": True}
    ).encode()
    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        sock.shutdown(socket.SHUT_WR)
        # The end of the client's stream reads as the client leaving, as nginx and uvicorn take it.
        assert sock.recv(65536) == b""
    deadline = time.monotonic() + 10
    while engine.stats()["running"] or engine.stats()["queue_depth"]:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.05)
    assert metric(server, answered) == before
    assert gen(server, prompt="Hi", ref="product-b", max_tokens=1)[0] == 200


def test_a_small_prefill_budget_chunks_prompts_and_answers_alike(
    server: BackgroundServer, repo: Repository, tiny_base: Path
) -> None:
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_num_batched_tokens=8)
    body = {"prompt": "Hello world, the cat sat on the mat. " * 3, "ref": "main"}
    body.update(max_tokens=8, temperature=0, logprobs=1)
    with BackgroundServer(config) as srv:
        engine = srv.state.engine
        assert engine is not None and engine.scheduler.max_num_batched_tokens == 8
        chunked = gen(srv, **body)[2]
        assert engine.scheduler.stats.steps > chunked["usage"]["prompt_tokens"] // 8
    whole = gen(server, **body)[2]
    assert chunked["text"] == whole["text"] and chunked["revision"] == whole["revision"]
    assert [e["logprob"] for e in chunked["logprobs"]] == pytest.approx(
        [e["logprob"] for e in whole["logprobs"]], abs=1e-4
    )
    with pytest.raises(ServerError, match="max_num_batched_tokens"):
        ServerConfig(repo=repo.git_dir, base_model=tiny_base, max_num_batched_tokens=0)


def test_past_max_queued_requests_is_503_overloaded_at_once(
    repo: Repository, tiny_base: Path
) -> None:
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        max_tokens_limit=400,
        max_batch_size=1,
        max_queued_requests=1,
    )
    long = {"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with BackgroundServer(config) as srv:
        engine = srv.state.engine
        assert engine is not None

        async def run() -> tuple[int, dict[str, str], Any, int]:
            import aiohttp

            async with aiohttp.ClientSession() as session:
                running = await session.post(srv.url + "/generate", json=long)
                await running.content.readline()  # it decodes: the one batch place is taken
                waiting = asyncio.ensure_future(session.post(srv.url + "/generate", json=long))
                deadline = time.monotonic() + 30
                while engine.waiting < 1:
                    assert time.monotonic() < deadline, engine.stats()
                    await asyncio.sleep(0.01)
                refused = await session.post(srv.url + "/generate", json={"prompt": "x"})
                answer = await refused.json()
                # /v1 gets the same refusal in OpenAI's shape.
                openai = await session.post(
                    srv.url + "/v1/completions", json={"model": "main", "prompt": "x"}
                )
                body = await openai.json()
                assert body["error"]["code"] == "overloaded", body
                running.close()
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
                return refused.status, dict(refused.headers), answer, openai.status

        status, headers, answer, openai_status = asyncio.run(run())
        assert (status, openai_status) == (503, 503), answer
        assert answer["reason"] == "overloaded" and "retry later" in answer["error"]
        # What the bound counts is what it says: choices (sequences), not requests.
        assert (
            "1 choice(s) (sequences) already wait to start and this request adds 1; at most 1 "
            in answer["error"]
        ), answer
        assert headers["Retry-After"] == "1"
        deadline = time.monotonic() + 10
        while engine.stats()["running"] or engine.waiting:
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.02)
        # Room again: the next request runs.
        assert request(srv.url + "/generate", {"prompt": "x", "max_tokens": 2})[0] == 200


# ---------------------------------------------------------------------------- peers
def test_http_equals_peft_greedy(
    server: BackgroundServer, tiny_base: Path, adapters: dict[str, Path], repo: Repository
) -> None:
    prod = repo.resolve("prod")  # adapter a, committed first
    for prompt in ("Hello world", "The answer is", "Paris is the capital of"):
        want = peft_greedy(tiny_base, adapters["a"], prompt, 12)
        status, _, body = gen(
            server, prompt=prompt, ref="prod", max_tokens=12, temperature=0, return_token_ids=True
        )
        assert status == 200 and body["revision"] == prod
        assert body["token_ids"] == want, prompt
    want = peft_greedy(tiny_base, adapters["b"], "Hello world", 12)
    assert (
        gen(
            server,
            prompt="Hello world",
            ref="product-b",
            max_tokens=12,
            temperature=0,
            return_token_ids=True,
        )[2]["token_ids"]
        == want
    )


def test_the_base_alone_is_served_by_its_name(
    server: BackgroundServer, tiny_base: Path, repo: Repository
) -> None:
    import openai

    name = tiny_base.resolve().name  # the default: the --base-model folder's name
    want = peft_greedy(tiny_base, None, "Hello world", 12)
    status, headers, body = gen(
        server, prompt="Hello world", ref=name, max_tokens=12, temperature=0, return_token_ids=True
    )
    assert status == 200 and body["token_ids"] == want
    assert body["revision"] is None and body["resolved_ref"] is None
    assert "X-Mint-Revision" not in headers
    adapted = gen(server, prompt="Hello world", ref="main", max_tokens=12, temperature=0)[2]
    assert adapted["text"] != body["text"]  # the adapter does change the answer
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    done = client.completions.create(model=name, prompt="Hello world", max_tokens=12, temperature=0)
    assert done.choices[0].text == body["text"] and done.system_fingerprint is None
    listed = {m.id: m for m in client.models.list()}
    assert listed[name].kind == "base" and listed[name].revision is None  # type: ignore[attr-defined]
    assert listed["main"].parent == name  # type: ignore[attr-defined]
    status, _, one = request(server.url + f"/v1/models/{name}")
    assert status == 200 and one["kind"] == "base"
    status, _, refused = request(
        server.url + "/v1/adapters/warm",
        {"ref": name},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert status == 400 and refused["error"]["code"] == "base_model"
    metrics = request(server.url + "/metrics")[2]
    assert 'mint_requests_total{ref="(base)",endpoint="/generate",status="200"}' in metrics


def test_the_base_name_wins_over_a_ref_of_that_name(
    repo: Repository, tiny_base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        repo=repo.work_tree or repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=128,
        served_model_name="product-b",
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"), BackgroundServer(config) as srv:
        body = gen(srv, prompt="Hello", ref="product-b", max_tokens=4, temperature=0)[2]
        assert body["revision"] is None
        full = gen(srv, prompt="Hello", ref="refs/heads/product-b", max_tokens=4)[2]
        assert full["revision"] == repo.resolve("product-b")
        # Listed once each: the branch by the full name that reaches it.
        listed = request(srv.url + "/v1/models")[2]["data"]
        ids = [m["id"] for m in listed]
        assert len(ids) == len(set(ids)) and "refs/heads/product-b" in ids
        assert next(m for m in listed if m["id"] == "product-b")["kind"] == "base"
        one = request(srv.url + "/v1/models/refs/heads/product-b")[2]
        assert one["kind"] == "branch" and one["revision"] == repo.resolve("product-b")
        # A hook's notify for that name loads nothing: no request would use it.
        told = request(srv.url + "/v1/refs/notify", {"ref": "product-b"}, headers=auth)[2]
        assert "base's served name" in told["warnings"][0]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'product-b', the base's served name, also names" in m for m in warned), warned
    for bad in ("main~1", "a..b", "", "HEAD", "refs/heads/x", " \x01"):
        with pytest.raises(ServerError, match="served-model-name"):
            ServerConfig(repo=repo.git_dir, base_model=tiny_base, served_model_name=bad)
    # The folder's name as given: a link to a snapshot is not served by the snapshot's hash.
    link = tmp_path / "my-base"
    link.symlink_to(tiny_base, target_is_directory=True)
    assert ServerConfig(repo=repo.git_dir, base_model=link).base_name == "my-base"
    # A hub cache snapshot is served by its hub id, as init records it, not by its hash.
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(tiny_base, target_is_directory=True)
    assert ServerConfig(repo=repo.git_dir, base_model=snapshot).base_name == "org/tiny"


def test_openai_client_completions_chat_and_streaming(
    server: BackgroundServer, repo: Repository
) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    main = repo.resolve("product-b")
    completion = client.completions.create(
        model="product-b", prompt="Hello world", max_tokens=5, temperature=0
    )
    plain = gen(server, prompt="Hello world", ref="product-b", max_tokens=5, temperature=0)[2]
    assert completion.choices[0].text == plain["text"]
    assert completion.system_fingerprint == main and completion.usage is not None
    assert completion.usage.completion_tokens == plain["usage"]["completion_tokens"]

    chat = client.chat.completions.create(
        model="product-b",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_tokens=5,
        temperature=0,
    )
    assert chat.choices[0].message.role == "assistant"
    rendered = gen(
        server,
        prompt="system: Be brief.\nuser: Hi\nassistant:",
        ref="product-b",
        max_tokens=5,
        temperature=0,
    )[2]
    assert chat.choices[0].message.content == rendered["text"]

    pieces = [
        c.choices[0].text
        for c in client.completions.create(
            model="product-b", prompt="Hello world", max_tokens=5, temperature=0, stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == plain["text"]
    chunks = list(
        client.chat.completions.create(
            model="product-b",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == rendered["text"]
    )
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == rendered["usage"]["completion_tokens"]
    )
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [rendered["finish_reason"]]

    models = {m.id for m in client.models.list()}
    assert {"main", "product-b", "prod"} <= models
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-ref", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="main", prompt="x", max_tokens=0)


def test_chat_template_from_tokenizer_config() -> None:
    from mintvcs.serve.http_chat import render_chat

    config = {
        "bos_token": "<s>",
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}",
    }
    turns = [("user", "hi"), ("assistant", "yo"), ("user", "ok")]
    assert render_chat([{"role": r, "content": c} for r, c in turns], config) == (
        "<s>[user]hi[assistant]yo[user]ok[assistant]",
        True,
    )
    assert render_chat([{"role": "user", "content": "hi"}], {}) == ("user: hi\nassistant:", False)


def test_chat_template_bos_is_not_doubled(
    tiny_base: Path, repo: Repository, tmp_path: Path
) -> None:
    # A base whose tokenizer adds BOS itself (as Llama's and Mistral's do) and whose chat template
    # writes {{ bos_token }}: the rendered prompt must be encoded without adding a second one.
    import shutil

    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    base = tmp_path / "base-with-bos"
    shutil.copytree(tiny_base, base)
    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    bos = tokenizer.id_to_token(1)
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
    )
    tokenizer.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": bos,
                "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                "{{ m['content'] }} {% endfor %}[assistant]",
            }
        )
    )
    config = ServerConfig(repo=repo.git_dir, base_model=base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        _, _, chat = request(
            srv.url + "/v1/chat/completions",
            {
                "model": "main",
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 1,
            },
        )
        rendered = f"{bos}[user] Hello [assistant]"
        _, _, plain = request(srv.url + "/generate", {"prompt": rendered, "max_tokens": 1})
        once = tokenizer.encode(rendered, add_special_tokens=False).ids
    assert once[0] == 1 and once[1] != 1
    # /generate adds the tokenizer's BOS to a raw prompt (one more token); chat does not.
    assert plain["usage"]["prompt_tokens"] == len(once) + 1
    assert chat["usage"]["prompt_tokens"] == len(once)


def test_openai_fields_that_would_change_the_output_are_refused(server: BackgroundServer) -> None:
    base = {"model": "main", "prompt": "Hello", "max_tokens": 2}
    for field, value in (
        ("best_of", 2),
        ("suffix", "end"),
        ("n", True),
    ):
        status, _, body = request(server.url + "/v1/completions", {**base, field: value})
        assert status == 400 and field in body["error"]["message"], (field, body)
    chat = {"model": "main", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),):
        status, _, body = request(server.url + "/v1/chat/completions", {**chat, field: value})
        assert status == 400 and field in body["error"]["message"], (field, body)
    # Their neutral values (what clients send by default) change nothing and are accepted.
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1}
    status, _, _ = request(server.url + "/v1/completions", {**base, **neutral, "best_of": 1})
    assert status == 200
    status, _, _ = request(
        server.url + "/v1/chat/completions", {**chat, "response_format": {"type": "text"}}
    )
    assert status == 200


def test_generate_refuses_what_it_would_otherwise_ignore(server: BackgroundServer) -> None:
    base = {"prompt": "Hello", "max_tokens": 2}
    # An OpenAI habit: `model` would be ignored and `ref`'s default, main, answer.
    status, _, body = request(server.url + "/generate", {**base, "model": "product-b"})
    assert status == 400 and "'ref'" in body["error"], body
    for field, value in (("n", 2), ("best_of", 3), ("echo", True), ("suffix", "end")):
        status, _, body = request(server.url + "/generate", {**base, field: value})
        assert status == 400 and body["error"].startswith(f"{field} is not supported"), body
    status, _, body = request(server.url + "/generate", {**base, "n": 1, "echo": False})
    assert status == 200, body


def test_chat_runs_to_the_context_end_by_default(server: BackgroundServer) -> None:
    chat = {"model": "main", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
    status, _, body = request(server.url + "/v1/chat/completions", chat)
    # No max_tokens: not the completions default of 16 but the server's limit (400 here).
    assert status == 200 and body["usage"]["completion_tokens"] == 400
    # max_completion_tokens, OpenAI's current name, wins over the deprecated max_tokens.
    status, _, body = request(
        server.url + "/v1/chat/completions",
        {**chat, "max_tokens": 2, "max_completion_tokens": 5},
    )
    assert body["usage"]["completion_tokens"] == 5
    # Whole-number floats are counts too (clients compute them with '/').
    status, _, body = request(
        server.url + "/v1/completions",
        {"model": "main", "prompt": "x", "max_tokens": 3.0, "seed": 7.0, "ignore_eos": True},
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    status, _, _ = request(
        server.url + "/v1/completions", {"model": "main", "prompt": "x", "max_tokens": 2.5}
    )
    assert status == 400


def test_lone_surrogates_and_overlong_ref_names_are_4xx(server: BackgroundServer) -> None:
    for path, raw in (
        ("/generate", b'{"prompt": "\\ud800"}'),
        ("/generate", b'{"prompt": "x", "ref": "ma\\udc00in"}'),
        ("/v1/completions", b'{"model": "main", "prompt": "\\ud800x"}'),
        (
            "/v1/chat/completions",
            b'{"model": "main", "messages": [{"role": "user", "content": "\\udfff"}]}',
        ),
    ):
        status, _, body = request(server.url + path, raw, method="POST")
        assert status == 400, (path, body)
        assert "surrogate" in json.dumps(body)
    # A ref name no file system can hold names no ref: 404, and the message names no path.
    for ref in ("a" * 300, "refs/heads/" + "b" * 300):
        status, _, body = gen(server, prompt="x", ref=ref, max_tokens=1)
        assert status == 404, body
        assert "/" not in body["error"].replace(ref, "")
        assert body["reason"] == "not_found"


def test_metrics_label_requests_by_ref_not_by_spelling(
    server: BackgroundServer, repo: Repository
) -> None:
    head = repo.resolve("main")
    for spec in ("main~0", "main^0~0", "refs/heads/main", head[:9], head):
        assert gen(server, prompt="x", ref=spec, max_tokens=1)[0] == 200
    _, _, text = request(server.url + "/metrics")
    labels = {
        line.split('ref="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith("mint_requests_total{")
    }
    assert "main" in labels and "(commit)" in labels
    assert not labels & {"main~0", "main^0~0", "refs/heads/main", head[:9], head}


def test_metrics_show_which_revision_each_ref_serves(
    server: BackgroundServer, repo: Repository
) -> None:
    # An operator following `main` from a training loop asks "which revision is live?".
    for spec in ("main", "prod"):
        assert gen(server, prompt="x", ref=spec, max_tokens=1)[0] == 200
    _, _, text = request(server.url + "/metrics")
    live = {
        line.split('ref="', 1)[1].split('"', 1)[0]: line.split('revision="', 1)[1][:40]
        for line in text.splitlines()
        if line.startswith("mint_ref_revision_info{")
    }
    assert live["main"] == repo.resolve("main") and live["prod"] == repo.resolve("prod")
    # A branch beside the tag `prod` (which `prod` resolves to) is a series of its own, named
    # as /v1/models names it: both were one `ref="prod"`, their requests and revisions mixed.
    porcelain.branch_create(repo, "prod", "product-b")
    try:
        assert gen(server, prompt="x", ref="refs/heads/prod", max_tokens=1)[0] == 200
        _, _, text = request(server.url + "/metrics")
        series = [
            line.split('ref="', 1)[1].split('"', 1)[0]
            for line in text.splitlines()
            if line.startswith("mint_ref_revision_info{")
        ]
        assert series.count("prod") <= 1 and "refs/heads/prod" in series
        requests = [line for line in text.splitlines() if line.startswith("mint_requests_total{")]
        assert any('ref="refs/heads/prod"' in line for line in requests)
    finally:
        porcelain.branch_delete(repo, "prod", force=True)
    # A spec with a suffix names a commit through its ref, not the ref's value.
    assert [names_an_ancestor(s) for s in ("main", "main~1", "main^2", "main@{1}")] == [
        False,
        True,
        True,
        True,
    ]


def test_models_list_skips_tags_of_trees(server: BackgroundServer, repo: Repository) -> None:
    # `git tag treetag main^{tree}` made the whole listing fail with 404.
    import subprocess

    git_dir = str(repo.git_dir)
    subprocess.run(["git", "--git-dir", git_dir, "tag", "treetag", "main^{tree}"], check=True)
    try:
        status, _, body = request(server.url + "/v1/models")
        assert status == 200, body
        ids = {m["id"] for m in body["data"]}
        assert "main" in ids and "treetag" not in ids
    finally:
        subprocess.run(
            ["git", "--git-dir", git_dir, "tag", "-d", "treetag"], check=True, capture_output=True
        )


def test_models_list_skips_a_ref_no_file_could_hold(
    server: BackgroundServer, repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    # git takes a component over 250 bytes in packed-refs (a clone writes it there): the
    # listing's tag lookup of its name answered 500 to every caller.
    long = "n" * 300
    packed = repo.git_dir / "packed-refs"
    before = packed.read_bytes() if packed.exists() else None
    lines = packed.read_text().splitlines(keepends=True) if before else []
    header = [line for line in lines[:1] if line.startswith("#")]
    records = lines[len(header) :]
    assert not any(line.startswith("^") for line in records), "peeled lines would move"
    records += [f"{repo.resolve('main')} refs/heads/{long}\n"]
    records += [f"{repo.resolve('main')} refs/tags/{long}\n"]
    records.sort(key=lambda line: line.split()[1])
    fresh = packed.with_name("packed-refs.new")
    fresh.write_text("".join(header + records))
    fresh.replace(packed)
    try:
        with caplog.at_level(logging.WARNING, logger="mintvcs.serve"):
            status, _, body = request(server.url + "/v1/models")
        assert status == 200, body
        ids = {m["id"] for m in body["data"]}
        assert "main" in ids and long not in ids and f"refs/heads/{long}" not in ids
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"leaves out refs/tags/{long}" in m for m in warned), warned
    finally:
        porcelain.branch_delete(repo, long, force=True)
        porcelain.tag_delete(repo, long)
    assert long not in packed.read_text()


def test_a_move_is_counted_once_whatever_specs_follow_it(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    # main~1 and main@{1} move to other commits than main; each used to count the move again.
    def moves() -> float:
        return metric(server, 'mint_ref_moves_total{ref="main"}')

    porcelain.commit(repo, "one", source=adapters["a1"], show_progress=False, allow_empty=True)
    porcelain.commit(repo, "two", source=adapters["a2"], show_progress=False, allow_empty=True)
    specs = ("main", "heads/main", "main~1", "main@{1}")
    for spec in specs:
        assert gen(server, prompt="x", ref=spec, max_tokens=1)[0] == 200
    time.sleep(0.5)  # the watcher has polled: nothing pending
    before = moves()
    porcelain.commit(repo, "three", source=adapters["a1"], show_progress=False, allow_empty=True)
    time.sleep(0.5)
    for spec in specs:
        assert gen(server, prompt="x", ref=spec, max_tokens=1)[0] == 200
    assert moves() == before + 1


def test_a_notify_for_a_ref_that_did_not_move_counts_no_move(
    server: BackgroundServer, repo: Repository
) -> None:
    def moves(ref: str) -> float:
        return metric(server, f'mint_ref_moves_total{{ref="{ref}"}}')

    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert gen(server, prompt="x", ref="prod", max_tokens=1)[0] == 200
    before = moves("prod")
    for ref in ("prod", "product-b"):  # one served, one not: neither moved
        status, _, body = request(server.url + "/v1/refs/notify", {"ref": ref}, headers=auth)
        assert status == 200, body
    assert (moves("prod"), moves("product-b")) == (before, 0.0)


def test_a_ref_to_a_commit_made_with_git_is_a_422(
    server: BackgroundServer, repo: Repository
) -> None:
    import subprocess

    def git(*args: str, data: str | None = None) -> str:
        return subprocess.run(
            ["git", "--git-dir", str(repo.git_dir), *args],
            input=data,
            capture_output=True,
            text=True,
            check=True,
            env={
                **os.environ,
                "GIT_AUTHOR_NAME": "a",
                "GIT_AUTHOR_EMAIL": "a@a",
                "GIT_COMMITTER_NAME": "a",
                "GIT_COMMITTER_EMAIL": "a@a",
            },
        ).stdout.strip()

    readme = git("hash-object", "-w", "--stdin", data="docs only\n")
    tree = git("mktree", data=f"100644 blob {readme}\tREADME.md\n")
    git("update-ref", "refs/heads/docs-only", git("commit-tree", tree, "-m", "docs"))
    try:
        status, _, body = gen(server, prompt="Hi", ref="docs-only", max_tokens=1)
        # It was a 500 internal_error, logged as a server fault.
        assert status == 422 and "not an adapter revision" in body["error"], body
    finally:
        git("update-ref", "-d", "refs/heads/docs-only")


def test_a_revision_of_a_newer_mintvcs_is_a_422_saying_to_upgrade(
    server: BackgroundServer, repo: Repository
) -> None:
    assert repo.work_tree is not None

    def newer(records: list[dict[str, Any]]) -> None:
        blob = repo.read_blob(records[0]["blob"])
        records[0]["blob"] = repo.add_blob(edit_blob_header(blob, version=2))

    revision = commit_with_manifest_files(repo.work_tree, [], newer)
    try:
        for _ in range(2):  # remembered, as every refusal: the revision will not change
            status, _, body = gen(server, prompt="Hi", ref="hostile", max_tokens=1)
            # It was a 500 internal_error: a client retried a revision no retry could serve.
            assert status == 422 and body["reason"] == "newer_format", body
            assert revision[:12] in body["error"] and "upgrade mintvcs" in body["error"], body
    finally:
        repo.refs.delete("refs/heads/hostile")


def test_models_listing_refuses_a_prefix_out_of_refs_and_a_limit_past_its_cap(
    server: BackgroundServer,
) -> None:
    # The prefix walked the file system from refs/heads/../../.. on the event loop (seconds,
    # then a 500); a NUL was a 500; and limit had no bound.
    for query, field in (
        ("prefix=" + "../" * 12, "prefix"),
        ("prefix=a%00b", "prefix"),
        ("limit=100001", "limit"),
        ("limit=0", "limit"),  # the base alone would be listed past it
    ):
        status, _, body = request(server.url + "/v1/models?" + query)
        assert status == 400 and field in body["error"]["message"], (query, body)


def test_an_echo_whose_logprobs_would_be_huge_is_refused(server: BackgroundServer) -> None:
    body = {"model": "main", "prompt": [5] * 400, "echo": True, "logprobs": 20, "max_tokens": 0}
    # n=128 repeats 8,400 prompt log-probabilities 128 times: it was built, gigabytes at n=1024.
    status, _, answer = request(server.url + "/v1/completions", {**body, "n": 128})
    assert status == 400 and "log-probabilities" in answer["error"]["message"], answer
    status, _, answer = request(server.url + "/v1/completions", {**body, "n": 2})
    assert status == 200 and len(answer["choices"][1]["logprobs"]["tokens"]) == 400


def test_completions_add_special_tokens_and_refused_text_options(server: BackgroundServer) -> None:
    body = {"model": "main", "prompt": "Hello there", "max_tokens": 1}
    # Taken (this tokenizer adds no BOS, so the count does not move), where it was ignored.
    assert request(server.url + "/v1/completions", {**body, "add_special_tokens": False})[0] == 200
    for field, value in (("skip_special_tokens", False), ("include_stop_str_in_output", True)):
        status, _, answer = request(server.url + "/v1/completions", {**body, field: value})
        assert status == 400 and field in answer["error"]["message"], answer


def test_notify_reads_its_body_under_the_same_limits(server: BackgroundServer) -> None:
    import http.client
    import urllib.parse

    where = urllib.parse.urlsplit(server.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=10)
    conn.putrequest("POST", "/v1/refs/notify")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Content-Length", str(100 << 20))
    conn.endheaders()
    # It waited for the whole declared body (no 413 up front, no body timeout).
    assert conn.getresponse().status == 413
    conn.close()


def test_models_retrieves_one_ref(server: BackgroundServer, repo: Repository) -> None:
    status, _, body = request(server.url + "/v1/models/prod")
    assert status == 200
    assert (body["id"], body["kind"], body["revision"]) == ("prod", "tag", repo.resolve("prod"))
    status, _, body = request(server.url + "/v1/models/product-b")
    assert (body["kind"], body["revision"]) == ("branch", repo.resolve("product-b"))
    status, _, body = request(server.url + "/v1/models/no-such-thing")
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_nan_is_never_accepted_anywhere(server: BackgroundServer) -> None:
    for field in ("temperature", "top_p", "presence_penalty", "repetition_penalty", "min_p"):
        raw = b'{"model": "main", "prompt": "x", "' + field.encode() + b'": NaN}'
        status, _, body = request(server.url + "/v1/completions", raw, method="POST")
        assert status == 400 and "finite" in body["error"]["message"]
    # Python's json.dumps writes float('nan') as this very literal, so clients do send it.
    assert json.dumps({"t": float("nan")}) == '{"t": NaN}'


def test_health_is_503_until_the_base_is_loaded(repo: Repository, tiny_base: Path) -> None:
    import threading

    from mintvcs.serve.app import build_engine

    gate = threading.Event()

    def slow_engine(config: ServerConfig) -> Any:
        gate.wait(30)
        return build_engine(config)

    srv = BackgroundServer(
        ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64),
        engine_factory=slow_engine,
    )
    srv.start(wait=False)
    try:
        status, headers, body = request(srv.url + "/health")
        assert status == 503 and body["status"] == "loading" and headers["Retry-After"] == "1"
        status, headers, body = request(srv.url + "/generate", {"prompt": "x"})
        assert status == 503 and body["reason"] == "loading"
        assert headers["Retry-After"] == "1"
        gate.set()
        srv.wait_ready(30)
        assert request(srv.url + "/health")[0] == 200
    finally:
        gate.set()
        srv.stop()


def test_vcs_cli_does_not_import_the_server() -> None:
    # `mintvcs serve` is registered lazily: importing the CLI must not pull in torch or aiohttp.
    import subprocess
    import sys

    code = "import sys, mintvcs.cli; print(any(m in sys.modules for m in ('torch', 'aiohttp', 'mintvcs.serve.app')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ}
    )
    assert out.stdout.strip() == "False"


def test_an_engine_whose_steps_keep_failing_is_unhealthy_and_streams_say_why(
    repo: Repository, tiny_base: Path
) -> None:
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=128)
    with BackgroundServer(config) as srv:
        engine = srv.state.engine
        assert engine is not None
        keys = engine.kv.keys[0]
        body = {"prompt": "Hello", "ref": "main", "max_tokens": 100, "ignore_eos": True}
        with urllib.request.urlopen(
            urllib.request.Request(
                srv.url + "/generate",
                data=json.dumps({**body, "stream": True}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=60,
        ) as resp:
            assert resp.readline().startswith(b"data: ")
            # A real fault, not a mock: layer 0's key cache loses its storage, so every
            # step from now on raises inside torch, as a GPU with a sticky error would.
            engine.kv.keys[0] = keys.new_empty(0)
            rest = resp.read().decode()
        events = sse_events(rest)
        assert events[-1][0] == "error", rest[-500:]
        assert "internal error (" in json.loads(events[-1][1])["error"]
        for _ in range(2):
            assert gen(srv, **body)[0] == 500
        status, _, health = request(srv.url + "/health")
        assert status == 503 and health["status"] == "unhealthy", health
        assert "engine steps failed" in health["error"]
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=30).read().decode()
        assert "\nmint_ready 0" in metrics
        engine.kv.keys[0] = keys  # the fault clears: one good step makes it healthy again
        assert gen(srv, **body)[0] == 200
        assert request(srv.url + "/health")[0] == 200


def test_a_body_that_stalls_is_408_and_the_connection_closes(
    repo: Repository, tiny_base: Path
) -> None:
    import socket
    from urllib.parse import urlsplit

    config = ServerConfig(
        repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64, body_timeout=0.5
    )
    with BackgroundServer(config) as srv:
        url = urlsplit(srv.url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prompt": '
            )
            answer = b""
            while chunk := sock.recv(65536):  # the server closes: recv returns b""
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(body)["reason"] == "body_timeout"
        assert gen(srv, prompt="Hi", max_tokens=1)[0] == 200  # and it goes on serving


def test_an_internal_error_before_the_body_was_read_closes_the_connection(
    repo: Repository, tiny_base: Path
) -> None:
    import socket

    async def fails_before_reading(request: web.Request) -> web.Response:
        raise RuntimeError("a fault in a handler, before it read the body")

    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64)
    app = create_app(config)
    app.router.add_post("/fails", fails_before_reading)
    with (
        serving_app(app) as port,
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
    ):
        sock.sendall(b"POST /fails HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n12345")
        head = sock.recv(65536)
        # The rest of the body would otherwise be read as the client's next request.
        assert head.startswith(b"HTTP/1.1 500 ") and b"Connection: close" in head, head
        sock.sendall(b"67890")  # the rest of the body: read and dropped, then the close
        while chunk := sock.recv(65536):
            assert not chunk.startswith(b"HTTP/"), chunk


def test_a_body_declared_too_large_is_413_at_once_and_a_client_gone_mid_body_is_499(
    repo: Repository, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket
    import time
    from urllib.parse import urlsplit

    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        url = urlsplit(srv.url)
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            started = time.monotonic()
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 99999999999\r\n\r\n{"prompt": '
            )
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 413"), head
            assert time.monotonic() - started < config.body_timeout / 2  # not after it
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(
                b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"prompt": '
            )
            time.sleep(0.3)  # the server is reading the body when the client leaves
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = request(srv.url + "/metrics")[2]
            if 'endpoint="/generate",status="499"' in text:
                break
            time.sleep(0.1)
        assert 'endpoint="/generate",status="499"' in text, text
        assert 'status="500"' not in text
        assert gen(srv, prompt="Hi", max_tokens=1)[0] == 200
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def test_metrics_label_at_most_max_ref_labels_refs(repo: Repository, tiny_base: Path) -> None:
    config = ServerConfig(
        repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64, max_ref_labels=2
    )
    with BackgroundServer(config) as srv:
        for ref in ("main", "product-b", "prod", "main"):
            assert gen(srv, prompt="Hi", ref=ref, max_tokens=1)[0] == 200
        text = request(srv.url + "/metrics")[2]
    series = [line for line in text.splitlines() if line.startswith("mint_requests_total{")]
    assert any('ref="main"' in line and line.endswith(" 2") for line in series), series
    assert any('ref="product-b"' in line for line in series)
    assert any('ref="(other)"' in line for line in series)  # prod came third
    assert not any('ref="prod"' in line for line in series)
    # Which revision each ref serves: only for the refs with a label of their own.
    info = [line for line in text.splitlines() if line.startswith("mint_ref_revision_info{")]
    assert {line.split('ref="')[1].split('"')[0] for line in info} == {"main", "product-b"}, info


def test_metrics_are_rendered_off_the_event_loop(repo: Repository, tiny_base: Path) -> None:
    from mintvcs.serve.http_metrics import Gauge

    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        rendered_on: list[threading.Thread] = []

        def value() -> float:
            rendered_on.append(threading.current_thread())
            return 1.0

        srv.state.metrics.add(Gauge("mint_test_probe", "where rendering runs", value))
        assert "\nmint_test_probe 1\n" in request(srv.url + "/metrics")[2]
        # Formatting many refs' series on the loop stalled every request meanwhile.
        assert rendered_on and srv._thread not in rendered_on, rendered_on


def test_a_broken_ref_is_left_out_of_models_and_its_error_names_no_server_path(
    server: BackgroundServer, repo: Repository
) -> None:
    import subprocess

    git_dir = repo.git_dir
    broken = git_dir / "refs" / "heads" / "zz-broken"
    broken.write_bytes(b"")  # a writer died mid-write
    subprocess.run(
        ["git", "--git-dir", str(git_dir), "update-ref", "refs/heads/zz-missing", "1" * 40],
        check=False,  # git refuses a missing object: write the file as another tool would
        capture_output=True,
    )
    (git_dir / "refs" / "heads" / "zz-missing").write_text("1" * 40 + "\n")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        # One bad ref made the whole listing a 500.
        status, _, body = request(server.url + "/v1/models")
        assert status == 200, body
        ids = {m["id"] for m in body["data"]}
        assert "main" in ids and not ids & {"zz-broken", "zz-missing"}
        status, _, body = gen(server, prompt="x", ref="zz-broken", max_tokens=1)
        assert status == 500 and ".mint/refs/heads/zz-broken" in body["error"], body
        assert str(git_dir.resolve()) not in body["error"]
        # A notify for it says it cannot be read, not that it was deleted.
        body = request(server.url + "/v1/refs/notify", {"ref": "zz-broken"}, headers=auth)[2]
        assert body["revision"] is None and "cannot be read" in body["warnings"][0], body
    finally:
        broken.unlink()
        (git_dir / "refs" / "heads" / "zz-missing").unlink()


def test_no_response_carries_the_bytes_of_a_file_a_ref_leads_to(
    server: BackgroundServer,
    repo: Repository,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A repository unpacked from a tarball may hold a ref that is a link to any file the
    # server's user can read; its content was sent to whoever named the ref (`content
    # b'root:$6$...'`), without a token. git's "ignoring broken ref" shows none of it.
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$S3CRETHASH:19000:0:99999:7:::\n")
    symbolic = tmp_path / "looks-symbolic"  # read as a symbolic ref to a name git refuses
    symbolic.write_text("ref: S3CRETHASH/../x:y\n")
    heads = repo.git_dir / "refs" / "heads"
    (heads / "zz-leak").symlink_to(secret)
    (heads / "zz-leak2").symlink_to(symbolic)
    try:
        for ref in ("zz-leak", "zz-leak2"):
            answers = [
                gen(server, prompt="hi", ref=ref, max_tokens=2),
                request(
                    server.url + "/v1/completions", {"model": ref, "prompt": "hi", "max_tokens": 2}
                ),
                request(server.url + f"/v1/models/{ref}"),
                request(server.url + "/v1/models"),
                request(server.url + "/v1/refs/notify", {"ref": ref}, headers=AUTH),
            ]
            for status, _, body in answers:
                assert "S3CRETHASH" not in json.dumps(body), (ref, status, body)
            status, _, body = answers[0]
            assert status == 500 and f".mint/refs/heads/{ref}" in body["error"], body
        assert not [r for r in caplog.records if "S3CRETHASH" in r.getMessage()]
    finally:
        (heads / "zz-leak").unlink()
        (heads / "zz-leak2").unlink()


def test_an_empty_notify_counts_the_moves_it_finds(
    server: BackgroundServer, repo: Repository, adapters: dict[str, Path]
) -> None:
    def moves() -> float:
        return metric(server, 'mint_ref_moves_total{ref="fast"}')

    with _served_branch(server, repo, "fast") as (move, one, other):
        before = moves()
        # The watcher polls every 0.15 s: a notify right after the move usually comes first.
        for _ in range(5):
            move(one)
            status, _, body = request(server.url + "/v1/refs/notify", {}, headers=AUTH)
            assert status == 200, body
            move(other)
            request(server.url + "/v1/refs/notify", {}, headers=AUTH)
        time.sleep(0.5)
        # Every move counted, whoever saw it first (the notify dropped them before).
        assert moves() == before + 10


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.contextmanager
def _served_branch(
    server: BackgroundServer, repo: Repository, name: str
) -> Iterator[tuple[Callable[[str], None], str, str]]:
    """Branch `name` at product-b's revision, served once, deleted after: yields what moves it
    (git update-ref, as another process would), and main's and product-b's commits."""
    import subprocess

    one, other = repo.resolve("main"), repo.resolve("product-b")
    porcelain.branch_create(repo, name, other)

    def move(commit: str) -> None:
        subprocess.run(
            ["git", "--git-dir", str(repo.git_dir), "update-ref", f"refs/heads/{name}", commit],
            check=True,
        )

    try:
        assert gen(server, prompt="x", ref=name, max_tokens=1)[0] == 200
        yield move, one, other
    finally:
        porcelain.branch_delete(repo, name, force=True)


def test_a_revision_pruned_while_served_by_id_is_404_and_its_pin_can_be_released(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from tests.mintvcs.storekit import git

    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    commit_on(repo, "main", adapters["a"], "a")
    pinned, evicted = (
        commit_on(repo, "x", adapters["b"], "b"),
        commit_on(repo, "y", adapters["a"], "y"),
    )
    others = [f"z{i}" for i in range(1, 4)]
    for name in others:
        commit_on(repo, name, adapters[name.replace("z", "a")], name)
    key = tmp_path / "token"
    key.write_text(TOKEN + "\n")
    key.chmod(0o600)
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_loras=2,
        max_cpu_loras=1,  # at max_rank: three revisions of `a`'s size
        max_rank=8,
        api_key_file=key,
    )
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with BackgroundServer(config) as srv:
        warm = {"revision": pinned, "pin": True}
        assert request(srv.url + "/v1/adapters/warm", warm, headers=auth)[0] == 200
        assert gen(srv, prompt="Hi", ref=evicted, max_tokens=1)[0] == 200
        for ref in others:  # evicted from its slot and from the host cache
            assert gen(srv, prompt="Hi", ref=ref, max_tokens=1)[0] == 200
        resident = request(srv.url + "/v1/adapters", headers=auth)[2]
        assert evicted not in str([resident["slots"], resident["host_cache"]])
        porcelain.checkout(repo, "main", force=True)
        for branch in ("x", "y", *others):
            porcelain.branch_delete(repo, branch, force=True)
        git(repo.git_dir, "reflog", "expire", "--expire=now", "--all")
        # Not `git gc`: it rewrites packed-refs, which the server's cached resolutions watch.
        git(repo.git_dir, "repack", "-a", "-d", "-q")
        git(repo.git_dir, "prune", "--expire=now")
        # Requested by id before, so its resolution is cached, but it watches the object store
        # too: the look-up again finds it gone, with the load path's reason.
        status, _, body = gen(srv, prompt="Hi", ref=evicted, max_tokens=1)
        assert status == 404 and "pruned since" in str(body), body
        # Now uncached too (packed-refs rewritten): a pin by id is released all the same.
        git(repo.git_dir, "pack-refs", "--all")
        status, _, body = request(
            srv.url + "/v1/adapters/unpin", {"revision": pinned}, headers=auth
        )
        assert status == 200 and body["unpinned"] == [pinned], body
        status, _, body = request(
            srv.url + "/v1/adapters/unpin", {"revision": evicted}, headers=auth
        )
        assert status == 404, body  # never pinned, and gone: nothing to release
        assert request(srv.url + "/v1/adapters", headers=auth)[2]["pinned"] == []


def test_the_server_lets_go_of_packs_another_process_deleted(
    tiny_base: Path, adapters: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs import maintenance
    from mintvcs.serve import app as server_app
    from tests.mintvcs.storekit import deleted_packs_held, git

    monkeypatch.setattr(server_app, "PACK_RELEASE_SECONDS", 0.1)
    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    commit_on(repo, "main", adapters["a"], "a")
    maintenance.gc(repo)
    config = ServerConfig(repo=repo.git_dir, base_model=tiny_base, port=0)
    with BackgroundServer(config) as srv:
        assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 200  # read from the pack
        git(repo.git_dir, "repack", "-a", "-d", "-f", "-q")
        deadline = time.monotonic() + 10
        while deleted_packs_held(repo.git_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert deleted_packs_held(repo.git_dir) == []
        assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 200


def test_a_move_is_logged_once_whichever_specs_name_the_ref(
    server: BackgroundServer, repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    # A notify caches the full name `refs/heads/X` beside the served `X`: each move of X was
    # then logged once per spec, while the metric counted it once.
    with _served_branch(server, repo, "twice") as (move, one, _):
        request(server.url + "/v1/refs/notify", {"ref": "refs/heads/twice"}, headers=AUTH)
        with caplog.at_level("INFO", logger="mintvcs.serve"):
            move(one)
            request(server.url + "/v1/refs/notify", {"ref": "twice"}, headers=AUTH)
            time.sleep(0.5)  # the watcher's poll too
        lines = [r.getMessage() for r in caplog.records if "moved" in r.getMessage()]
        assert len([line for line in lines if "twice" in line]) == 1, lines


def test_a_branch_deleted_and_made_again_elsewhere_is_logged_and_counted(
    server: BackgroundServer, repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    # `branch -D x; branch x other` served the other revision without a line or a count: the
    # deletion dropped what the watcher knew, so the branch made again was not a move.
    def moves() -> float:
        return metric(server, 'mint_ref_moves_total{ref="again"}')

    with _served_branch(server, repo, "again") as (_, one, other):
        before = moves()
        with caplog.at_level("INFO", logger="mintvcs.serve"):
            porcelain.branch_delete(repo, "again", force=True)
            time.sleep(0.5)  # the watcher's poll
            porcelain.branch_create(repo, "again", one)
            deadline = time.monotonic() + 5
            while moves() == before:  # the poller sees it before any request
                assert time.monotonic() < deadline, "the branch made again was not a move"
                time.sleep(0.05)
        said = [r.getMessage() for r in caplog.records if "again" in r.getMessage()]
        assert said == [
            f"refs/heads/again deleted (it named {other[:12]})",
            f"again (refs/heads/again) moved {other[:12]} -> {one[:12]}",
        ], said
        assert gen(server, prompt="x", ref="again", max_tokens=1)[2]["revision"] == one
        # Deleted, made again at that commit (no move), deleted again: each deletion is said
        # (a marker kept until the next move said the second nothing).
        line = f"refs/heads/again deleted (it named {one[:12]})"
        for _ in range(2):
            with caplog.at_level("INFO", logger="mintvcs.serve"):
                caplog.clear()
                porcelain.branch_delete(repo, "again", force=True)
                deadline = time.monotonic() + 5
                while line not in [r.getMessage() for r in caplog.records]:
                    assert time.monotonic() < deadline, "a deletion was not logged"
                    time.sleep(0.05)
            time.sleep(1.1)
            porcelain.branch_create(repo, "again", one)
            assert gen(server, prompt="x", ref="again", max_tokens=1)[2]["revision"] == one


def test_a_repository_gone_while_serving_is_503_not_an_unknown_ref(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Moved, deleted or unmounted under a running server: every ref answered 404 "unknown
    # revision" (which a balancer or client caches as final), /health said ok, nothing was logged.
    work = tmp_path / "repo"
    repo = porcelain.init(work, str(tiny_base))
    commit_on(repo, "main", peft_adapter, "a")
    config = ServerConfig(repo=work, base_model=tiny_base, port=0, max_model_len=64)
    caplog.set_level(logging.INFO, logger="mintvcs.serve")
    with BackgroundServer(config) as srv:
        assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 200
        work.rename(tmp_path / "moved")
        try:
            for spec in ("main", "no-such-branch", "main~1"):
                for _ in range(2):
                    status, headers, body = gen(srv, prompt="Hi", ref=spec, max_tokens=1)
                    assert status == 503 and headers["Retry-After"] == "1", body
                    assert body["reason"] == "repository_gone", body
                    assert body["error"].startswith("the repository .mint is gone or unreadable")
                    assert str(tmp_path) not in body["error"]  # no server path for clients
            status, _, body = request(srv.url + "/v1/completions", {"model": "main", "prompt": "x"})
            assert status == 503 and "is gone or unreadable" in body["error"]["message"], body
            assert request(srv.url + "/v1/models")[0] == 503  # not a listing of the base alone
            status, _, body = request(srv.url + "/health")
            assert status == 503 and body["status"] == "degraded", body
            assert "is gone or unreadable" in body["error"]
            assert metric(srv, "mint_ready") == 0
            # The base alone needs no repository.
            assert gen(srv, prompt="Hi", ref=config.base_name, max_tokens=1)[0] == 200
        finally:
            (tmp_path / "moved").rename(work)
        assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 200
        status, _, body = request(srv.url + "/health")
        assert status == 200 and body["status"] == "ok", body
        # Gone again within the minute the log holds repeats back: told again all the same,
        # or the log would end on "back" while requests get 503.
        work.rename(tmp_path / "moved")
        try:
            assert gen(srv, prompt="Hi", ref="main", max_tokens=1)[0] == 503
        finally:
            (tmp_path / "moved").rename(work)
    changes = [
        r for r in caplog.records if any(m in r.getMessage() for m in ("is gone", "is back"))
    ]
    assert [("gone" if "is gone" in r.getMessage() else "back") for r in changes] == [
        "gone",
        "back",
        "gone",
    ]  # once each time, not per request
    assert all(r.levelno == logging.WARNING for r in changes)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]


def test_a_base_without_a_tokenizer_warns_at_start_and_offers_no_token_ids_on_generate(
    tmp_path: Path, repo: Repository, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # It started "ready" without a word, and /generate told clients to "send token ids instead
    # of text", which /generate refuses.
    base = Path(shutil.copytree(tiny_base, tmp_path / "no-tokenizer"))
    (base / "tokenizer.json").unlink()
    caplog.set_level(logging.WARNING, logger="mintvcs.serve")
    config = ServerConfig(repo=repo.git_dir, base_model=base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        warned = [r.getMessage() for r in caplog.records if "tokenizer.json" in r.getMessage()]
        assert warned == [
            f"{base} has no tokenizer.json: text prompts will be refused (400), and only "
            "/v1/completions with a prompt of token ids is served"
        ]
        status, _, body = gen(srv, prompt="Hello", ref=config.base_name, max_tokens=1)
        assert status == 400 and "no tokenizer.json" in body["error"], body
        assert "token ids" not in body["error"] and str(base) not in body["error"]
        assert gen(srv, prompt=[1, 2, 3], ref=config.base_name, max_tokens=1)[0] == 400
        status, _, body = request(
            srv.url + "/v1/completions",
            {"model": config.base_name, "prompt": [1, 2, 3], "max_tokens": 1},
        )
        assert status == 200, body


def test_a_base_with_only_a_slow_tokenizer_is_told_how_to_write_tokenizer_json(
    tmp_path: Path, repo: Repository, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # vocab.json + merges.txt (a GPT-2-style slow tokenizer) and no tokenizer.json: the warning
    # said only "no tokenizer.json", not what the checkpoint had nor how to get one.
    from transformers import AutoTokenizer

    base = Path(shutil.copytree(tiny_base, tmp_path / "slow"))
    fast = json.loads((base / "tokenizer.json").read_text())
    (base / "tokenizer.json").unlink()
    (base / "vocab.json").write_text(json.dumps(fast["model"]["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in fast["model"]["merges"]]
    (base / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer_config = json.loads((base / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    (base / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    caplog.set_level(logging.WARNING, logger="mintvcs.serve")
    config = ServerConfig(repo=repo.git_dir, base_model=base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        warned = [r.getMessage() for r in caplog.records if "tokenizer.json" in r.getMessage()]
        assert len(warned) == 1, warned
        assert "it has vocab.json and merges.txt" in warned[0], warned
        assert "AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)" in warned[0], warned
        assert "sentencepiece" not in warned[0]
        assert gen(srv, prompt="Hello", ref=config.base_name, max_tokens=1)[0] == 400
    # The advice, followed, gives a base this server reads, with the tokenizer's own ids.
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(base))
    assert (
        json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
        == fast["model"]["vocab"]
    )
    with BackgroundServer(config) as srv:
        assert gen(srv, prompt="Hello", ref=config.base_name, max_tokens=1)[0] == 200


def test_expect_continue_with_a_body_declared_too_large_is_413_without_the_invitation(
    server: BackgroundServer,
) -> None:
    # aiohttp's default handler answered 100 Continue first: the client then started sending
    # the body the handler refuses unread (curl had sent 2.6 MB of 50 MB).
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    head = (
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nExpect: 100-continue\r\nContent-Length: {{size}}\r\n\r\n"
    )
    for path in ("/generate", "/v1/completions", "/v1/refs/notify"):
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(head.format(path=path, size=50_000_000).encode())
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413"), answer
            assert b"100 Continue" not in answer
    # A body within the limit is still invited, and served.
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.format(path="/generate", size=len(body)).encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")


def test_a_413_before_the_body_was_read_closes_the_connection(server: BackgroundServer) -> None:
    # It was kept alive: a client that did not send the body (Expect) and reused the
    # connection had its next request read as that body, and got EOF some 10 s later.
    import http.client
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    conn.putrequest("POST", "/generate")
    conn.putheader("Content-Length", "50000000")
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    response = conn.getresponse()
    assert (response.status, response.getheader("Connection")) == (413, "close")
    assert response.will_close
    response.read()
    conn.close()
    # A chunked body past the limit (aiohttp's own 413, after reading part of it) too.
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n100000\r\n"
            + b" " * (1 << 20)  # the limit, and 16 bytes more (no last chunk: it goes on)
            + b"\r\n10\r\n"
            + b" " * 16
            + b"\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"Connection: close" in answer, answer[:300]
    assert request(server.url + "/health")[0] == 200


def test_more_cpu_threads_than_cpus_is_a_warning(
    repo: Repository, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mintvcs.serve.threads import available_cpus

    caplog.set_level(logging.WARNING, logger="mintvcs.serve")
    cpus = available_cpus()
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=64,
        device="cpu",
        cpu_threads=cpus + 1,
    )
    with BackgroundServer(config):
        pass
    warned = [r.getMessage() for r in caplog.records if "--cpu-threads" in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith(
        f"cpu_threads (--cpu-threads) {cpus + 1} is more than the {cpus} CPUs this process may use"
    )


def test_every_model_id_listed_serves_the_revision_it_lists(
    server: BackgroundServer, repo: Repository
) -> None:
    # The listing shadowed a short name by the base's and a tag's only, and /v1/models/{id}
    # tried the tag, then the branch; /generate resolves in git's order: a 40-hex id, a
    # pseudo-ref in the git directory, refs/NAME, the tag, the branch. Each of these branches
    # was listed by its short name with its own revision, which /generate did not serve.
    old, new = repo.resolve("product-b"), repo.resolve("main")
    made = {"heads/x": old, "x": new, "tags/v1": old, new: old, "ORIG_HEAD": old}
    for name, start in made.items():
        porcelain.branch_create(repo, name, start)
    porcelain.tag_create(repo, "v1", new)
    (repo.git_dir / "ORIG_HEAD").write_text(new + "\n")  # as git reset writes it
    try:
        listed = request(server.url + "/v1/models")[2]["data"]
        ids = {m["id"]: m["revision"] for m in listed if m["kind"] != "base" and m["id"] != "dora"}
        for name in ("heads/x", "tags/v1", new, "ORIG_HEAD"):
            assert name not in ids and ids[f"refs/heads/{name}"] == old, ids
        assert ids["x"] == new and ids["v1"] == new, ids
        for name, revision in ids.items():
            ask = {"prompt": "x", "ref": name, "max_tokens": 1}
            body = request(server.url + "/generate", ask)[2]
            assert body["revision"] == revision, (name, body)
            status, _, one = request(server.url + "/v1/models/" + name)
            assert status == 200 and one["revision"] == revision, (name, one)
        # What the short names serve: never the branch of that name.
        for name in ("heads/x", "tags/v1"):
            status, _, one = request(server.url + "/v1/models/" + name)
            assert status == 200 and one["revision"] == new and one["id"] == name, one
        for name in (new, "ORIG_HEAD"):
            assert request(server.url + "/v1/models/" + name)[0] == 404
    finally:
        (repo.git_dir / "ORIG_HEAD").unlink()
        porcelain.tag_delete(repo, "v1")
        for name in made:
            porcelain.branch_delete(repo, name, force=True)


def test_models_leaves_out_a_ref_name_that_is_not_utf8(
    server: BackgroundServer, repo: Repository
) -> None:
    # Listed as "bad\udcff": a lone surrogate no client can send back (/generate refuses such
    # a body as invalid Unicode), and that strict JSON readers refuse.
    path = os.fsencode(repo.git_dir / "refs" / "heads") + b"/bad\xff"
    with open(path, "w") as handle:
        handle.write(repo.resolve("main") + "\n")
    try:
        raw = urllib.request.urlopen(server.url + "/v1/models?prefix=bad").read()
        ids = [m["id"] for m in json.loads(raw)["data"]]
        assert ids == [] and b"\\udc" not in raw, raw
    finally:
        os.unlink(path)


def _completions(srv: BackgroundServer, **body: Any) -> list[int]:
    status, _, answer = request(
        srv.url + "/v1/completions",
        {
            "model": "main",
            "prompt": "Hello world",
            "max_tokens": 6,
            "return_token_ids": True,
            **body,
        },
    )
    assert status == 200, answer
    return list(answer["choices"][0]["token_ids"])


def test_generation_config_sampling_defaults_apply_to_requests_that_leave_them_out(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    """As vLLM's --generation-config auto: the model's temperature/top_k/... are the defaults,
    a request's own value wins, and --generation-config vllm turns them off."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    (base / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 1})
    )
    porcelain.commit(
        porcelain.init(tmp_path / "repo", str(base)), "m", source=peft_adapter, show_progress=False
    )
    config = ServerConfig(repo=tmp_path / "repo", base_model=base, port=0, max_model_len=64)
    with BackgroundServer(config) as srv:
        greedy = _completions(srv, temperature=0)
        # top_k 1 from the file: every seed draws the greedy tokens.
        assert [_completions(srv, seed=s) for s in range(4)] == [greedy] * 4
        # The request's own top_k wins: seeds draw differently at temperature 0.6.
        drawn = [_completions(srv, seed=s, top_k=0) for s in range(4)]
        assert len({tuple(d) for d in drawn}) > 1, drawn
    neutral = dataclasses.replace(config, generation_config="vllm")
    with BackgroundServer(neutral) as srv:
        drawn = [_completions(srv, seed=s) for s in range(4)]
        assert len({tuple(d) for d in drawn}) > 1, drawn


def test_generation_config_max_new_tokens_is_the_chat_default(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    """As vLLM's chat: max_new_tokens bounds a chat that leaves max_tokens out; a request's own
    max_tokens wins, a completion keeps 16, and --generation-config vllm reads none of it."""
    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    (base / "generation_config.json").write_text(json.dumps({"max_new_tokens": 5}))
    porcelain.commit(
        porcelain.init(tmp_path / "repo", str(base)), "m", source=peft_adapter, show_progress=False
    )
    config = ServerConfig(repo=tmp_path / "repo", base_model=base, port=0, max_model_len=64)

    def chat(srv: BackgroundServer, **body: Any) -> int:
        status, _, answer = request(
            srv.url + "/v1/chat/completions",
            {
                "model": "main",
                "messages": [{"role": "user", "content": "Hello"}],
                "ignore_eos": True,
                **body,
            },
        )
        assert status == 200, answer
        return int(answer["usage"]["completion_tokens"])

    with BackgroundServer(config) as srv:
        assert chat(srv) == 5
        assert chat(srv, max_tokens=7) == 7
        assert len(_completions(srv, max_tokens=None, ignore_eos=True)) == 16
    with BackgroundServer(dataclasses.replace(config, generation_config="vllm")) as srv:
        assert chat(srv) > 5


def test_generation_config_values_out_of_range_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A value a request could not send is left out with a warning, not a 400 on every request."""
    from mintvcs.serve.app import read_sampling_defaults

    (tmp_path / "generation_config.json").write_text(
        json.dumps(
            {
                "temperature": -1,
                "top_k": 1.5,
                "top_p": 0.9,
                "min_p": True,
                "repetition_penalty": 1.05,
                "max_new_tokens": 0,
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"):
        assert read_sampling_defaults(tmp_path) == {"top_p": 0.9, "repetition_penalty": 1.05}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "temperature" in warned and "top_k" in warned and "min_p" in warned
    assert "max_new_tokens" in warned


# ---------------------------------------------------------------------------- slow readers
def _stream_never_read(srv: BackgroundServer, body: dict[str, Any]) -> Any:
    """A raw socket with a small receive buffer that posts a request (streamed unless `body`
    says otherwise) and reads nothing."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(srv.url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.hostname, url.port))
    data = json.dumps({"stream": True, **body}).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def _closed_by_server(sock: Any, within: float) -> bool:
    """Whether the server has closed `sock` (reading what it holds), waiting `within` s at most."""
    sock.settimeout(within)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _wait_for_499(srv: BackgroundServer, within: float) -> float:
    """Seconds until /v1/completions has a 499 in mint_requests_total (AssertionError past `within`)."""
    started = time.monotonic()
    while 'endpoint="/v1/completions",status="499"' not in request(srv.url + "/metrics")[2]:
        assert time.monotonic() - started < within, "no 499 counted"
        time.sleep(0.05)
    return time.monotonic() - started


def _released(srv: BackgroundServer, within: float = 10) -> dict[str, Any]:
    """The engine's stats once nothing runs, waits or holds an adapter slot."""
    engine = srv.state.engine
    assert engine is not None
    deadline = time.monotonic() + within
    while True:
        stats = engine.stats()
        busy = [s for s in engine.residency_snapshot()["slots"] if s["refs"]]
        if not stats["running"] and not stats["queue_depth"] and not busy:
            assert stats["kv_slots_free"] == engine.config.max_batch_size, stats
            return stats
        assert time.monotonic() < deadline, (stats, busy)
        time.sleep(0.02)


# ~10 MB of events (logprobs): more than the socket buffers of a client that reads nothing hold.
_FLOOD = {"model": "main", "prompt": "hi", "n": 32, "max_tokens": 400, "logprobs": 20}


def test_a_stream_whose_client_reads_nothing_is_cancelled_after_the_send_timeout(
    repo: Repository, tiny_base: Path
) -> None:
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        send_timeout=1.0,
        max_stream_backlog=10**6,  # not what ends it: the whole output fits
    )
    with BackgroundServer(config) as srv:
        sock = _stream_never_read(srv, {**_FLOOD, "ignore_eos": True, "max_tokens": 500})
        with sock:
            took = _wait_for_499(srv, within=30)
            assert took < 20, took
            # Closed from the server's side, not by the client's giving up.
            assert _closed_by_server(sock, within=5)
        _released(srv)
        series = 'mint_requests_total{ref="main",endpoint="/v1/completions",status="200"}'
        assert metric(srv, series) == 0
        assert gen(srv, prompt="Hi", max_tokens=1)[0] == 200  # and it goes on serving


def test_an_answer_whose_client_reads_nothing_is_dropped_after_the_send_timeout(
    repo: Repository, tiny_base: Path
) -> None:
    # A whole (not streamed) answer was written by aiohttp after the handler, with no deadline:
    # a client that never read it held its connection, and the server's drain, for ever.
    config = ServerConfig(
        repo=repo.git_dir, base_model=tiny_base, port=0, max_model_len=512, send_timeout=1.0
    )
    with BackgroundServer(config) as srv:
        body = {**_FLOOD, "stream": False, "ignore_eos": True, "max_tokens": 500}
        sock = _stream_never_read(srv, body)  # an answer of megabytes: more than the buffers
        with sock:
            took = _wait_for_499(srv, within=60)
            assert took < 45, took
            assert _closed_by_server(sock, within=5)
        _released(srv)
        assert gen(srv, prompt="Hi", max_tokens=1)[0] == 200  # and it goes on serving


def test_a_stream_that_falls_past_its_backlog_is_cancelled_and_closed_at_once(
    repo: Repository, tiny_base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        send_timeout=600.0,  # not what ends it
        max_stream_backlog=64,
    )
    with BackgroundServer(config) as srv:
        engine = srv.state.engine
        assert engine is not None
        cancelled = engine.stats()["requests_cancelled"]
        with caplog.at_level(logging.WARNING, "mintvcs.serve"):
            # Generation runs far ahead of a client that reads nothing: cancelled mid-way.
            sock = _stream_never_read(srv, {**_FLOOD, "ignore_eos": True, "max_tokens": 500})
            with sock:
                _wait_for_499(srv, within=30)
                assert _closed_by_server(sock, within=5)
            stats = _released(srv)
        # All 32 choices were cancelled, not run to their end.
        assert stats["requests_cancelled"] - cancelled == 32, stats
        assert stats["generated_tokens"] < 32 * 500
        warned = [
            r.getMessage() for r in caplog.records if "its connection closed" in r.getMessage()
        ]
        assert len(warned) == 1 and "64 events behind" in warned[0], warned
        assert gen(srv, prompt="Hi", max_tokens=1)[0] == 200


def test_a_stream_read_late_but_within_the_limits_is_whole(
    repo: Repository, tiny_base: Path
) -> None:
    config = ServerConfig(
        repo=repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        send_timeout=3.0,
        max_stream_backlog=4 * 40 + 8,
    )
    with BackgroundServer(config) as srv:
        body = {"model": "main", "prompt": "hi", "n": 4, "max_tokens": 40, "ignore_eos": True}
        sock = _stream_never_read(srv, body)
        with sock:
            time.sleep(1.5)  # a pause shorter than the send timeout, then reading
            sock.settimeout(30)
            answer = b""
            while b"data: [DONE]" not in answer:
                chunk = sock.recv(4096)
                assert chunk, answer[-200:]
                answer += chunk
                time.sleep(0.001)
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        texts = rest.decode(errors="replace")
        assert texts.count('"finish_reason":"length"') == 4, texts[-500:]
        series = 'mint_requests_total{ref="main",endpoint="/v1/completions",status="200"}'
        deadline = time.monotonic() + 5
        while metric(srv, series) != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
