"""bench/serve.py's prompts: the HTTP side sends their text, PEFT their ids; both must be the same tokens."""

from __future__ import annotations

import importlib.util
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
