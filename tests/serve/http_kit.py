"""Helpers for the HTTP server tests: a urllib client, SSE parsing, adapter variants, commits."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from mintvcs import porcelain
from mintvcs.serve.app import BackgroundServer
from mintvcs.store import Repository

TOKEN = "s3cret-token"


def request(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], Any]:
    """One HTTP call with urllib: (status, headers, parsed JSON or text); errors are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method or ("POST" if data is not None else "GET")
    )
    req.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, head, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        status, head, raw = err.code, dict(err.headers), err.read()
    text = raw.decode()
    try:
        return status, head, json.loads(text)
    except json.JSONDecodeError:
        return status, head, text


def metric(server: BackgroundServer, series: str) -> float:
    """The value of one /metrics series (`name` or `name{labels}`), 0 when it is not there yet."""
    text = request(server.url + "/metrics")[2]
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(series + " ")]
    return float(values[0]) if values else 0.0


def variant(source: Path, dest: Path, factor: float) -> Path:
    """A copy of a PEFT adapter with lora_B scaled: a distinct revision that acts differently."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "adapter_config.json", dest / "adapter_config.json")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    scaled = {k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(scaled, str(dest / "adapter_model.safetensors"))
    return dest


def commit_on(repo: Repository, branch: str, source: Path, message: str) -> str:
    """Commit the adapter in `source` on `branch` (created from HEAD if new) with porcelain."""
    if repo.current_branch() != branch:
        if repo.refs.read(f"refs/heads/{branch}") is None:
            porcelain.checkout(repo, "HEAD", new_branch=branch, force=True)
        else:
            porcelain.checkout(repo, branch, force=True)
    return porcelain.commit(repo, message, source=source, verify=False, show_progress=False).commit


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event in a body."""
    out = []
    for block in text.strip().split("\n\n"):
        event, data = None, []
        for line in block.splitlines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
        out.append((event, "\n".join(data)))
    return out


def peft_greedy(base: Path, adapter: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
    """PEFT's greedy continuation of `prompt` (token ids, EOS included when reached); with no
    adapter, transformers' own on the base."""
    import torch
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = Tokenizer.from_file(str(base / "tokenizer.json"))
    ids = tokenizer.encode(prompt).ids
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=2,
        )
    return [int(t) for t in out[0, len(ids) :]]


def gen(server: BackgroundServer, **body: Any) -> tuple[int, dict[str, str], Any]:
    """POST /generate."""
    return request(server.url + "/generate", body)


@contextmanager
def serving_app(app: web.Application) -> Iterator[int]:
    """`app` on a loopback port, its loop in a thread of its own; yields the port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> int:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return int(runner.addresses[0][1])

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
