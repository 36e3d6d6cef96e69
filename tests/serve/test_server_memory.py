"""An embedded server lets go of its base: after stop(), and while it keeps a load error."""

from __future__ import annotations

import gc
import json
import threading
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from mintvcs import porcelain
from mintvcs.serve.app import BackgroundServer, ServerConfig
from tests.fixtures import build_base


def _base_tensors(vocab: int) -> int:
    """How many live tensors have `vocab` as a dimension: a base's embedding, head, logits."""
    gc.collect()
    with warnings.catch_warnings():  # torch warns on some deprecated attributes gc reaches
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and vocab in o.shape)


def _server(tmp_path: Path, base: Path) -> BackgroundServer:
    repo = porcelain.init(tmp_path / "repo", str(base))
    return BackgroundServer(
        ServerConfig(repo=repo.work_tree or repo.git_dir, base_model=base, port=0)
    )


def test_a_stopped_server_keeps_no_tensor_of_its_base(tmp_path: Path) -> None:
    # A vocabulary of its own: no other tensor of the process has that dimension.
    base = build_base(tmp_path / "base", vocab_size=391)
    threads = set(threading.enumerate())
    srv = _server(tmp_path, base)
    srv.start()
    # A request served puts the app in aiohttp's module-wide middleware cache, which outlives
    # the server: whatever the app's state still holds at the end stays with it.
    urllib.request.urlopen(srv.url + "/health").read()
    assert _base_tensors(391) > 0
    srv.stop()
    # The threads that loaded and closed the engine are joined: one still ending could hold it.
    assert set(threading.enumerate()) <= threads
    del srv
    assert _base_tensors(391) == 0


def test_a_failed_load_keeps_no_tensor_of_the_base(tmp_path: Path) -> None:
    base = build_base(tmp_path / "base", vocab_size=393)
    config = json.loads((base / "config.json").read_text())
    # Refused only once every tensor is read: the error's traceback reaches them all.
    (base / "config.json").write_text(json.dumps({**config, "vocab_size": 394}))
    srv = _server(tmp_path, base)
    with pytest.raises(Exception, match="vocab_size"):
        srv.start()
    # The server stays up to report the error (/health 503 failed), holding it, not the base.
    with pytest.raises(urllib.error.HTTPError, match="503"):
        urllib.request.urlopen(srv.url + "/health")
    assert _base_tensors(393) == 0
    with pytest.raises(Exception, match="vocab_size"):
        srv.wait_ready()
    srv.stop()
    del srv
    assert _base_tensors(393) == 0
