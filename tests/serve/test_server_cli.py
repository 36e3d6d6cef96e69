"""`mintvcs serve` as a process: prints where it listens, /health turns 200 once loaded, SIGTERM drains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mintvcs import porcelain
from tests.mintvcs.storekit import (
    ENV,
    console_script,
    loose_path,
    pack_each_object,
    without_root_reads,
)
from tests.serve.http_kit import commit_on, request, variant


def _start(args: list[str], wrap: Callable[[list[str]], list[str]] = list) -> subprocess.Popen[str]:
    """`mintvcs serve ARGS` as a process; `wrap` the command line to run it otherwise."""
    env = {**os.environ, "MINT_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(
        wrap([sys.executable, "-m", "mintvcs.serve.cli", "serve", *args]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # SIGHUP as a terminal's process gets it, whatever the runner left (under nohup the
        # server rightly keeps ignoring it, and the SIGHUP test would wait for nothing).
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )


def _start_with_key_file(
    tmp_path: Path, tiny_base: Path, token: str, mode: int, *args: str
) -> tuple[subprocess.Popen[str], Path]:
    """`mintvcs serve` of a new repository, its admin token in a file of the given mode."""
    porcelain.init(tmp_path / "repo", str(tiny_base))
    key = tmp_path / "token"
    key.write_text(token + "\n")
    key.chmod(mode)
    proc = _start(
        [
            *("--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base), "--port", "0"),
            *("--api-key-file", str(key), *args),
        ]
    )
    return proc, key


def _url_when_ready(proc: subprocess.Popen[str]) -> str:
    """The URL the server's first line names, once /health answers 200."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    assert match, line
    url = match.group(1)
    deadline = time.monotonic() + 60
    while request(url + "/health")[0] != 200:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    return url


@pytest.mark.slow
def test_serve_process_health_and_sigterm_drain(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    repo = porcelain.init(tmp_path / "repo", str(tiny_base))
    commit = porcelain.commit(
        repo, "a", source=peft_adapter, verify=False, show_progress=False
    ).commit
    proc = _start(
        [
            "--repo",
            str(tmp_path / "repo"),
            "--base-model",
            str(tiny_base),
            "--port",
            "0",
            "--max-model-len",
            "512",
            # 30 s (the default) is plenty on an idle machine; on a loaded one (CI neighbours,
            # a second OpenMP team) the tokens came slower and the drain cut the stream.
            "--drain-timeout",
            "300",
            "--cpu-threads",
            "1",
            "--served-model-name",
            "plain-base",
        ]
    )
    try:
        url = _url_when_ready(proc)
        status, _, alone = request(url + "/generate", {"prompt": "Hi", "ref": "plain-base"})
        assert status == 200 and alone["revision"] is None
        assert request(url + "/v1/models")[2]["data"][0]["id"] == "plain-base"

        # A long streaming request is running when SIGTERM arrives: it must finish, then the process exits 0.
        body = json.dumps(
            {"prompt": "Hi", "ref": "main", "max_tokens": 200, "stream": True, "ignore_eos": True}
        ).encode()
        req = urllib.request.Request(
            url + "/generate", data=body, headers={"Content-Type": "application/json"}
        )
        resp = urllib.request.urlopen(req, timeout=60)
        assert resp.headers["X-Mint-Revision"] == commit
        first = resp.readline()
        assert first.startswith(b"data: ")
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.append(resp.read()))
        reader.start()
        proc.send_signal(signal.SIGTERM)
        reader.join(300)
        text = rest[0].decode()
        assert "event: done" in text and '"completion_tokens":200' in text
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "draining" in out and "stopped" in out and "on cpu (1 thread);" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_request_queued_before_sigterm_is_answered_by_the_drain(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    repo = porcelain.init(tmp_path / "repo", str(tiny_base))
    porcelain.commit(repo, "a", source=peft_adapter, verify=False, show_progress=False)
    proc = _start(
        [
            *("--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base), "--port", "0"),
            *("--max-batch-size", "1", "--max-model-len", "512", "--cpu-threads", "1"),
        ]
    )
    try:
        url = _url_when_ready(proc)
        body = {"prompt": "Hi", "max_tokens": 150, "stream": True, "ignore_eos": True}
        req = urllib.request.Request(
            url + "/generate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        running = urllib.request.urlopen(req, timeout=120)
        assert running.readline().startswith(b"data: ")
        queued: list[tuple[int, Any]] = []
        waiter = threading.Thread(
            target=lambda: queued.append(
                request(url + "/generate", {"prompt": "Hi", "max_tokens": 4}, timeout=120)[::2]
            )
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while "mint_queue_depth 1" not in request(url + "/metrics")[2]:
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        running.read()
        waiter.join(120)
        # The engine took it before the signal: it runs (it used to wait, then get 503 draining).
        assert queued and queued[0][0] == 200, queued
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_key_file_read_that_hangs_does_not_keep_the_server_from_exiting(
    tmp_path: Path, tiny_base: Path
) -> None:
    proc, key = _start_with_key_file(
        tmp_path, tiny_base, "the-token", 0o600, "--max-model-len", "128", "--cpu-threads", "1"
    )
    try:
        url = _url_when_ready(proc)
        key.unlink()
        os.mkfifo(key)  # the next re-read blocks opening it, for ever: no writer comes
        time.sleep(2.5)  # the file is re-read every second
        auth = {"Authorization": "Bearer the-token"}
        assert request(url + "/v1/adapters", headers=auth, timeout=5)[0] == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)  # a stuck read on a joined thread: never
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_bad_base_model_in_one_line(tmp_path: Path) -> None:
    repo_dir = tmp_path / "repo"
    porcelain.init(repo_dir)
    (tmp_path / "empty").mkdir()
    proc = _start(["--repo", str(repo_dir), "--base-model", str(tmp_path / "empty"), "--port", "0"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().startswith("error: ") and "config.json" in err and "Traceback" not in err


@pytest.mark.slow
def test_mintvcs_dash_c_serves_the_repo_and_base_named_from_its_directory(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # `--repo` and `--base-model` are taken from -C's directory, as every path argument is.
    repo = porcelain.init(tmp_path / "d" / "repo", str(tiny_base))
    commit = porcelain.commit(repo, "a", source=peft_adapter, verify=False, show_progress=False)
    (tmp_path / "d" / "base").symlink_to(tiny_base)
    command = [console_script(), "-C", "d", "serve", "--repo", "repo", "--base-model", "base"]
    proc = subprocess.Popen(
        [*command, "--port", "0", "--cpu-threads", "1"],
        cwd=tmp_path,
        env={**ENV, "MINT_LOG_LEVEL": "WARNING"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = _url_when_ready(proc)
        models = request(url + "/v1/models")[2]["data"]
        assert [m["revision"] for m in models if m["id"] == "main"] == [commit.commit]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_serve_keeps_serving_after_its_stdout_is_closed(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # `mintvcs serve ... | head -1`: the reader takes the port line and closes the pipe.
    repo = porcelain.init(tmp_path / "repo", str(tiny_base))
    porcelain.commit(repo, "a", source=peft_adapter, verify=False, show_progress=False)
    proc = _start(["--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base), "--port", "0"])
    try:
        assert proc.stdout is not None
        match = re.search(r"listening on (http://\S+)", proc.stdout.readline())
        assert match
        url = match.group(1)
        proc.stdout.close()  # before the "ready" line is printed
        deadline = time.monotonic() + 60
        while request(url + "/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "the server died"
            time.sleep(0.05)
        status, _, body = request(url + "/generate", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _long_stream(
    tmp_path: Path, peft_adapter: Path, drain_timeout: str
) -> tuple[subprocess.Popen[str], str, Any]:
    """A server with room for an 8000-token reply, and a streamed /generate that asks for one
    (its first event read); returns the process, its URL and the open response."""
    from tests.fixtures import build_base

    base = build_base(tmp_path / "long-base", max_position_embeddings=8192)
    repo = porcelain.init(tmp_path / "repo", str(base))
    porcelain.commit(repo, "a", source=peft_adapter, verify=False, show_progress=False)
    proc = _start(
        [
            *("--repo", str(tmp_path / "repo"), "--base-model", str(base), "--port", "0"),
            *("--max-model-len", "8192", "--max-tokens-limit", "8000"),
            *("--drain-timeout", drain_timeout),
        ]
    )
    url = _url_when_ready(proc)
    body = json.dumps({"prompt": "Hi", "max_tokens": 8000, "stream": True, "ignore_eos": True})
    req = urllib.request.Request(
        url + "/generate", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    resp = urllib.request.urlopen(req, timeout=120)
    assert resp.readline().startswith(b"data: ")
    return proc, url, resp


@pytest.mark.slow
def test_serve_second_signal_stops_without_waiting_for_the_drain(
    tmp_path: Path, peft_adapter: Path
) -> None:
    # As uvicorn and vLLM: the first SIGTERM drains, a second one stops at once.
    proc, url, resp = _long_stream(tmp_path, peft_adapter, "600")
    try:
        assert proc.stdout is not None
        rest: list[bytes] = []

        def read_rest() -> None:
            try:
                rest.append(resp.read())
            except Exception as err:  # the server closes the stream mid-way: that is the point
                rest.append(repr(err).encode())

        reader = threading.Thread(target=read_rest)
        reader.start()
        proc.send_signal(signal.SIGTERM)
        while "draining" not in proc.stdout.readline():
            assert proc.poll() is None
        assert request(url + "/health")[0] == 503  # draining: the long request still runs
        status, headers, _ = request(url + "/generate", {"prompt": "Hi"})
        assert status == 503 and headers["Retry-After"] == "1"
        assert headers["Connection"] == "close"  # no keep-alive for requests it will refuse
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - started < 15, "the second signal did not stop the server"
        assert proc.returncode == 0, err
        assert "stopped" in out and "Traceback" not in err
        assert "1 request(s) still running; signalled again: stopping at once" in err, err
        reader.join(30)
        assert b"event: done" not in rest[0]  # cut short, not finished
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _usage_line(tmp_path: Path, *args: str) -> str:
    """The one stderr line of a `mintvcs serve` refused for its options (exit 2, nothing served)."""
    result = subprocess.run(
        [sys.executable, "-m", "mintvcs.cli", "serve", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "listening" not in result.stdout
    return lines[0]


def test_serve_option_out_of_range_is_one_usage_line(tmp_path: Path, tiny_base: Path) -> None:
    line = _usage_line(tmp_path, "--base-model", str(tiny_base), "--ref-poll-interval", "5")
    assert "--ref-poll-interval" in line and "0.01<=x<=1.0" in line
    # One token of context: passed the CLI, then the engine refused it once the base loaded.
    line = _usage_line(tmp_path, "--base-model", str(tiny_base), "--max-model-len", "1")
    assert "--max-model-len" in line and "x>=2" in line, line


def test_an_empty_host_is_refused_not_every_interface(tmp_path: Path, tiny_base: Path) -> None:
    # `--host "$HOST"` with HOST unset bound 0.0.0.0, admin endpoints and all.
    for host in ("", " "):
        line = _usage_line(tmp_path, "--base-model", str(tiny_base), "--host", host, "--port", "0")
        assert line.startswith("error: Invalid value for '--host': empty"), line


def test_options_server_config_refuses_are_usage_errors(tmp_path: Path, tiny_base: Path) -> None:
    # ServerConfig's own checks exited 1 with a bare error line; as options that cannot go
    # together or an invalid value, they are usage errors (exit 2), naming serve's --help.
    base = ("--base-model", str(tiny_base), "--port", "0")
    line = _usage_line(tmp_path, *base, "--api-key-scope", "all")
    assert line.startswith("error: --api-key-scope all needs --api-key-file"), line
    assert line.endswith(" serve --help')"), line
    for name, problem in (("", "cannot name the base model"), ("HEAD", "reads as a revision")):
        line = _usage_line(tmp_path, *base, "--served-model-name", name)
        assert line.startswith(
            f"error: Invalid value for '--served-model-name': {name!r} {problem}"
        )
        assert line.endswith(" serve --help')"), line


def test_host_all_addresses_takes_ipv4_too_and_a_bracketed_address_is_read(
    tmp_path: Path, tiny_base: Path
) -> None:
    # `--host ::` listened on IPv6 alone (asyncio makes its sockets IPv6-only), so IPv4
    # clients and probes were refused; vLLM's server takes both there. `[::1]` was an error.
    porcelain.init(tmp_path / "repo", str(tiny_base))
    for host, clients in (("::", ("127.0.0.1", "::1")), ("[::1]", ("::1",))):
        proc = _start(
            [
                *("--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base)),
                *("--host", host, "--port", "0"),
            ]
        )
        try:
            url = _url_when_ready(proc)
            port = int(url.rsplit(":", 1)[1])
            for client in clients:
                shown = f"[{client}]" if ":" in client else client
                assert request(f"http://{shown}:{port}/health")[0] == 200, (host, client)
        finally:
            proc.terminate()
            proc.communicate(timeout=60)


def test_a_signal_while_the_base_loads_stops_the_server_at_once(
    tmp_path: Path, tiny_base: Path
) -> None:
    # A large checkpoint loads for minutes in a thread nothing can interrupt; an orchestrator's
    # SIGTERM must not have to wait for it. The load is made slow here by its factory.
    porcelain.init(tmp_path / "repo", str(tiny_base))
    script = f"""
import asyncio, sys, time
from mintvcs.serve.app import ServerConfig, build_engine, serve_until_signalled

def slow_engine(config):
    time.sleep(120)
    return build_engine(config)

config = ServerConfig(repo={str(tmp_path / "repo")!r}, base_model={str(tiny_base)!r}, port=0)
sys.exit(asyncio.run(serve_until_signalled(config, engine_factory=slow_engine)))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a buffered pipe
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "MINT_LOG_LEVEL": "WARNING"},
    )
    try:
        assert proc.stdout is not None
        url = re.search(r"listening on (http://\S+)", proc.stdout.readline())
        assert url, proc.stderr.read() if proc.stderr else ""
        assert request(url.group(1) + "/health")[2]["status"] == "loading"
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - started < 15, "SIGTERM waited for the base to load"
        assert proc.returncode == 0, err
        assert "stopped while the base model was loading" in out and "Traceback" not in err
        assert "draining" not in out  # nothing runs to drain, and a second signal changes nothing
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sighup_drains_as_sigterm_and_a_readable_token_file_is_a_warning(
    tmp_path: Path, tiny_base: Path
) -> None:
    proc, _ = _start_with_key_file(tmp_path, tiny_base, "secret", 0o644, "--max-model-len", "64")
    try:
        _url_when_ready(proc)
        proc.send_signal(signal.SIGHUP)  # by default it would kill the process on the spot
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "draining" in out and "stopped" in out
        assert "readable by others (mode 644)" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_under_nohup_sighup_is_still_ignored(tmp_path: Path, tiny_base: Path) -> None:
    porcelain.init(tmp_path / "repo", str(tiny_base))
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "mintvcs.serve.cli", "serve"),
            *("--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base), "--port", "0"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MINT_LOG_LEVEL": "WARNING"},
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    try:
        url = _url_when_ready(proc)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert proc.poll() is None and request(url + "/health")[0] == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "stopped" in out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_requests_still_running_at_the_drain_timeout_end_then(
    tmp_path: Path, peft_adapter: Path
) -> None:
    proc, _, resp = _long_stream(tmp_path, peft_adapter, "1")
    try:
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        rest = resp.read()  # the stream ends when the server ends it
        ended = time.monotonic() - started
        _, err = proc.communicate(timeout=60)
        # It used to go on for two cleanup graces (2 s each) past the drain timeout.
        assert ended < 2.5, f"the stream ran {ended:.1f} s past SIGTERM (drain timeout 1 s)"
        assert proc.returncode == 0, err
        assert "1 request(s) still running after 1 s; closing anyway" in err, err
        assert b"event: error" in rest and b"event: done" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_server_config_keeps_its_limits_consistent(tiny_base: Path) -> None:
    from mintvcs.serve.app import ServerConfig, ServerError, engine_config

    # A request without max_tokens gets at most the limit (the default, 16, refused a limit under it).
    assert (
        ServerConfig(repo=tiny_base, base_model=tiny_base, max_tokens_limit=8).default_max_tokens
        == 8
    )
    with pytest.raises(ServerError, match="--api-key-scope all needs --api-key-file"):
        ServerConfig(repo=tiny_base, base_model=tiny_base, api_key_scope="all")
    # On CPU the host cache holds half types in fp32, as the slots do: sized so, it keeps
    # --max-cpu-loras revisions whatever --dtype says (it used to keep half as many).
    sizes = {
        dtype: engine_config(
            ServerConfig(repo=tiny_base, base_model=tiny_base, device="cpu", dtype=dtype)
        ).host_cache_bytes
        for dtype in ("float32", "bfloat16", "float16")
    }
    assert len(set(sizes.values())) == 1, sizes


def test_an_unknown_log_level_is_one_error_line(tmp_path: Path, tiny_base: Path) -> None:
    porcelain.init(tmp_path / "repo", str(tiny_base))
    args = ["--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base), "--port", "0"]
    done = subprocess.run(
        [sys.executable, "-m", "mintvcs.serve.cli", "serve", *args],
        env={**os.environ, "MINT_LOG_LEVEL": "verbose"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # It was a traceback (ValueError: Unknown level); `debug` was one too.
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: MINT_LOG_LEVEL='verbose'"), done.stderr


def test_serve_with_a_full_stdout_keeps_serving(tmp_path: Path, tiny_base: Path) -> None:
    # `mintvcs serve > /dev/full`: the socket is bound, only the "listening" line cannot be
    # written. That was "cannot serve on HOST:PORT: No space left on device", a bind failure,
    # and status 1. As with a closed stdout, it serves on; the line goes to the log.
    repo_dir = tmp_path / "repo"
    porcelain.init(repo_dir, str(tiny_base))
    with open("/dev/full", "w") as full:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "mintvcs.cli", "serve", "--repo", str(repo_dir)),
                *("--base-model", str(tiny_base), "--port", "0"),
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "MINT_LOG_LEVEL": "WARNING"},
        )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "WARNING mintvcs.serve: write failure on 'stdout': No space left on device" in line
        match = re.search(r"serving on without it: mintvcs serve: listening on (http://\S+)", line)
        assert match, line
        deadline = time.monotonic() + 60
        while request(match.group(1) + "/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None, "the server died"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "Exception ignored" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_files_the_server_may_not_read_are_named_in_one_line_not_a_traceback(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # A service account serving a repository another user committed to with umask 077: the ref
    # was "corrupt ... restore it" (a sound ref), the object a 500 "internal error
    # (PermissionError)" with a traceback in the log for every request.
    work = tmp_path / "repo"
    repo = porcelain.init(work, str(tiny_base))
    first = commit_on(repo, "main", peft_adapter, "a")
    second = commit_on(repo, "two", variant(peft_adapter, tmp_path / "b", 2.0), "b")
    locked = work / ".mint" / "refs" / "heads" / "locked"
    locked.write_text(first + "\n")
    for path in (locked, loose_path(work, second)):
        path.chmod(0o000)
    proc = _start(
        ["--repo", str(work), "--base-model", str(tiny_base), "--port", "0"], without_root_reads
    )
    try:
        url = _url_when_ready(proc)

        def gen(ref: str) -> tuple[int, dict[str, str], Any]:
            return request(url + "/generate", {"prompt": "Hi", "ref": ref, "max_tokens": 1})

        assert gen("main")[0] == 200
        status, _, body = gen("locked")
        assert status == 500 and body["error"] == (
            "ref file .mint/refs/heads/locked cannot be read: permission denied (check its "
            "owner and mode)"
        ), body
        for _ in range(4):
            status, _, body = gen("two")
            assert status == 500, body
            assert body["error"].endswith(
                f".mint/objects/{second[:2]}/{second[2:]} cannot be read: permission denied "
                "(check its owner and mode)"
            ), body
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "internal error" not in err, err
        # A line for each failure, not for each request: a repeat within a minute is held back.
        assert err.count("cannot be read: permission denied") == 2, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _sharded(tiny_base: Path, dest: Path) -> Path:
    """A copy of tiny_base with its tensors in two shards and an index naming them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_base, dest)
    (dest / "model.safetensors").unlink()
    tensors = load_file(str(tiny_base / "model.safetensors"))
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(dest / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return dest


@pytest.mark.parametrize("case", ["unreadable", "bad shard", "kv cache"])
def test_a_base_that_fails_to_load_is_one_stderr_line_naming_the_cause(
    tmp_path: Path, tiny_base: Path, case: str
) -> None:
    # It was "No such file or directory" for a file the server may not read, a safetensors
    # message naming no shard, the allocator's text naming no option; on stdout, and again in
    # the log.
    porcelain.init(tmp_path / "repo")
    base, args, wrap, want = tiny_base, [], list, ""
    if case == "unreadable":
        base = _sharded(tiny_base, tmp_path / "base")
        (base / "model-00002-of-00002.safetensors").chmod(0o000)
        wrap = without_root_reads
        want = (
            f"{base}/model-00002-of-00002.safetensors cannot be read: permission denied (check "
            "its owner and mode)"
        )
    elif case == "bad shard":
        base = _sharded(tiny_base, tmp_path / "base")
        shard = base / "model-00002-of-00002.safetensors"
        shard.write_bytes(shard.read_bytes()[:100])  # cut short, as by a full disk
        want = f"{shard} is not a readable safetensors file: "
    else:
        args = ["--max-batch-size", "100000000", "--max-model-len", "64"]
        want = "lower max_batch_size (--max-batch-size) or max_model_len (--max-model-len)"
    proc = _start(
        ["--repo", str(tmp_path / "repo"), "--base-model", str(base), "--port", "0", *args], wrap
    )
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and err.startswith("error: the base model failed to load: "), err
    assert want in err, err
    if case == "kv cache":
        assert "the KV cache for 100000000 sequences of 64 tokens needs" in err
        assert re.search(r"needs \d+ bytes \([\d.]+ GiB\) of \S+ memory", err), err
    assert "error" not in out and "Traceback" not in err


# ESC starting a colour, and a bidi override that reorders the rest of the line.
HOSTILE = "\x1b[31m\u202e"


def test_serve_error_line_is_escaped_as_every_commands(tmp_path: Path, tiny_base: Path) -> None:
    # It was printed raw: on a terminal the rest of the line turned red and was reordered.
    where = tmp_path / f"empty{HOSTILE}"
    where.mkdir()
    proc = _start(["--repo", str(where), "--base-model", str(tiny_base), "--port", "0"])
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.count("\n") == 1, err
    assert "not a mintvcs repository" in err and "empty\\x1b[31m\\u202e" in err, err
    assert "\x1b" not in err and "\u202e" not in err, err


@pytest.mark.slow
def test_serve_escapes_names_in_its_listening_and_log_lines(
    tmp_path: Path, tiny_base: Path
) -> None:
    # The repository's path in the listening line, and a ref name in a log line (a broken
    # ref /v1/models leaves out), reached the terminal raw. The ref's name is one git takes:
    # C1's CSI (xterm acts on it) and a bidi override.
    where = tmp_path / f"srv{HOSTILE}"
    porcelain.init(where, str(tiny_base))
    (where / ".mint" / "refs" / "heads" / "bad\x9b31m\u202e").write_text("1" * 40 + "\n")
    proc = _start(["--repo", str(where), "--base-model", str(tiny_base), "--port", "0"])
    try:
        assert proc.stdout is not None
        listening = proc.stdout.readline()
        assert f"repository {tmp_path}/srv\\x1b[31m\\u202e, base" in listening, listening
        url = re.search(r"listening on (http://\S+)", listening).group(1)  # type: ignore[union-attr]
        deadline = time.monotonic() + 60
        while request(url + "/health")[0] != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        request(url + "/v1/models")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        out = listening + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    (left_out,) = [line for line in err.splitlines() if "leaves out" in line] or [err]
    assert "refs/heads/bad\\x9b31m\\u202e" in left_out, left_out
    assert not {"\x1b", "\x9b", "\u202e"} & set(err + out), err + out


def test_serve_reads_a_store_of_more_packs_than_descriptors(
    tmp_path: Path, tiny_base: Path, peft_adapter: Path
) -> None:
    # Every pack took two descriptors for the server's life (our reader's maps and dulwich's
    # open files): under its limit, the first /generate filled the table, and every request
    # after it failed ("ref file .mint/refs/main cannot be read (Too many open files)") until
    # a gc without the limit. With the packs closed when not in use, a few descriptors do.
    repo = porcelain.init(tmp_path / "repo", str(tiny_base))
    commits = [
        commit_on(repo, "main", variant(peft_adapter, tmp_path / f"v{i}", 1 + i / 4), f"v{i}")
        for i in range(3)
    ]
    repo.close()
    assert pack_each_object(tmp_path / "repo" / ".mint") > 24
    limit = 48  # the server idles at ~15; with two per pack, 24 packs alone took them all
    proc = _start(
        [
            *("--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base)),
            *("--port", "0", "--cpu-threads", "1", "--max-model-len", "64"),
        ],
        wrap=lambda command: ["sh", "-c", f'ulimit -n {limit} && exec "$@"', "sh", *command],
    )
    try:
        url = _url_when_ready(proc)
        for ref, commit in (("main", commits[2]), ("main~2", commits[0]), ("main~1", commits[1])):
            for _ in range(2):
                status, _, body = request(
                    url + "/generate", {"prompt": "Hi", "ref": ref, "max_tokens": 2}
                )
                assert status == 200 and body["revision"] == commit, body
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert "Too many open files" not in err, err


def _healthy(url: str) -> bool:
    """Whether /health answers 200 within 5 s."""
    try:
        return request(url + "/health", timeout=5)[0] == 200
    except OSError:  # a timeout, a refused connection
        return False


def test_serve_at_its_descriptor_limit_logs_a_line_not_a_flood(
    tmp_path: Path, tiny_base: Path
) -> None:
    # 100 idle clients of a server allowed 64 descriptors: asyncio's accept loop reported each
    # failed accept() (hundreds a second), each logged as an error with its traceback, and each
    # of those failed again in the log's formatter ("--- Logging error ---"): 13 MB in 6 s.
    import socket

    porcelain.init(tmp_path / "repo", str(tiny_base)).close()
    log = tmp_path / "serve.log"  # a file, as a service's log: a pipe nobody reads fills up
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            [
                *("sh", "-c", 'ulimit -n 64 && exec "$@"', "sh", sys.executable, "-m"),
                *("mintvcs.serve.cli", "serve", "--repo", str(tmp_path / "repo")),
                *("--base-model", str(tiny_base), "--port", "0", "--cpu-threads", "1"),
            ],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "MINT_LOG_LEVEL": "WARNING"},
        )
    clients: list[socket.socket] = []
    try:
        url = _url_when_ready(proc)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        clients = [socket.create_connection((host, int(port))) for _ in range(100)]
        time.sleep(3)
        for client in clients:
            client.close()
        deadline = time.monotonic() + 30
        while not _healthy(url):  # served again once they go
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        for client in clients:
            client.close()
        proc.kill()
        proc.communicate(timeout=60)
    err = log.read_text()
    lines = err.splitlines()
    accept = [line for line in lines if "cannot accept new connections" in line]
    assert 1 <= len(accept) <= 2, err[:3000]
    assert "Too many open files" in accept[0] and "(ulimit -n)" in accept[0]
    assert "Logging error" not in err and "Traceback" not in err, err[:3000]
    assert len(lines) <= 5, err[:3000]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_signal_while_serve_imports_is_a_clean_stop(
    tmp_path: Path, tiny_base: Path, name: str
) -> None:
    # docs/http.md promises exit 0 for SIGTERM while the base loads; in the seconds torch takes
    # to import, before the server's handlers were in place, the signal killed it (143, 129).
    # The signal is sent here as torch's import starts, as the installed script runs serve.
    porcelain.init(tmp_path / "repo", str(tiny_base))
    script = f"""
import builtins, os, signal, sys
real_import = builtins.__import__
def signalling_import(name, *args, **kwargs):
    if name == "torch":
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.{name})
    return real_import(name, *args, **kwargs)
builtins.__import__ = signalling_import
sys.argv[0] = "mintvcs"
from mintvcs.console import main
sys.exit(main())
"""
    args = ["serve", "--repo", str(tmp_path / "repo"), "--base-model", str(tiny_base)]
    done = subprocess.run(
        [sys.executable, "-c", script, *args, "--port", "0"],
        env={**ENV, "MINT_LOG_LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stdout
