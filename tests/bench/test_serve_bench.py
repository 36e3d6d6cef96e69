"""bench/serve.py's prompts: the HTTP side sends their text, PEFT their ids; both must be the same tokens."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from tokenizers import Tokenizer

from mintvcs.serve.tiny import build_tokenizer_json

ROOT = Path(__file__).resolve().parents[2]


def _bench_serve() -> object:
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompts_round_trip_through_text_at_their_exact_length() -> None:
    tokenizer = Tokenizer.from_str(build_tokenizer_json())
    prompts = _bench_serve().prompts(128, 16, tokenizer)  # type: ignore[attr-defined]
    assert len(prompts) == 128 and len({tuple(p) for p in prompts}) == 128
    for ids in prompts:
        assert len(ids) == 16
        assert tokenizer.encode(tokenizer.decode(ids)).ids == ids


def test_a_revision_that_never_shows_ends_the_wait() -> None:
    wait = _bench_serve().wait_for_revision  # type: ignore[attr-defined]
    answers = iter(["old", "old", "new"])
    assert wait(lambda: next(answers), "new", 5.0) is not None
    start = time.perf_counter()
    assert wait(lambda: "old", "new", 0.2) is None
    assert time.perf_counter() - start < 5


def test_results_are_saved_whole_and_without_a_leftover(tmp_path: Path) -> None:
    save = _bench_serve().save_json  # type: ignore[attr-defined]
    path = tmp_path / "serve.json"
    save(path, {"refs_2": {"tokens_per_s": 1.0}})
    save(path, {"refs_2": {"tokens_per_s": 2.0}, "hot_swap_s": "timed out"})
    assert json.loads(path.read_text())["hot_swap_s"] == "timed out"
    assert [p.name for p in tmp_path.iterdir()] == ["serve.json"]
