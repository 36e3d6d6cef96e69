"""The base fingerprint identifies the model, not how its files store it; bad weight files are named."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mintvcs.base import (
    BaseModelError,
    fingerprint,
    fingerprints,
    legacy_fingerprints,
    read_base_model,
)
from mintvcs.checkpoint import CheckpointError, safetensors_header
from mintvcs.errors import error_text
from tests.fixtures import build_base

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1048576\n"
)


def _old_fingerprint(directory: Path) -> str:
    """The digest versions before the normalised identity recorded (format.md §5): raw shape
    keys, every tensor of every *.safetensors file."""
    keys = (
        "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    )  # fmt: skip
    config = json.loads((directory / "config.json").read_text())
    tensors: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        header.pop("__metadata__", None)
        tensors.update({name: info["shape"] for name, info in header.items()})
    identity = {
        "config": {k: config.get(k) for k in keys},
        "tensors": dict(sorted(tensors.items())),
    }
    return "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _without_head_dim(directory: Path) -> Path:
    """A config as many hub configs are: no head_dim (implied by hidden_size / heads)."""
    config = json.loads((directory / "config.json").read_text())
    config.pop("head_dim", None)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_copy_resaved_by_transformers_keeps_the_fingerprint(tmp_path: Path, arch: str) -> None:
    """save_pretrained writes the implied head_dim, and casts to bf16: the same model."""
    from transformers import AutoModelForCausalLM

    original = _without_head_dim(build_base(tmp_path / "orig", arch))
    resaved = tmp_path / "bf16"
    model = AutoModelForCausalLM.from_pretrained(str(original), dtype=torch.bfloat16)
    model.save_pretrained(resaved)
    assert "head_dim" in json.loads((resaved / "config.json").read_text())
    assert fingerprint(resaved) == fingerprint(original)
    # A repository made before holds the old digest of the original: the copy answers to it too.
    assert _old_fingerprint(original) != _old_fingerprint(resaved)
    assert _old_fingerprint(original) in fingerprints(resaved)
    assert _old_fingerprint(original) in fingerprints(original)


def test_a_tied_head_stored_under_either_name_or_both_is_one_model(tmp_path: Path) -> None:
    """The hub stores the embedding, safetensors' save_model the head, some exports both."""
    base = build_base(tmp_path / "tied", tie_word_embeddings=True)
    tensors = load_file(base / "model.safetensors")
    assert "lm_head.weight" not in tensors
    prints = {}
    for how in ("embed", "head", "both"):
        copy = shutil.copytree(base, tmp_path / how)
        stored = dict(tensors)
        if how == "both":
            stored["lm_head.weight"] = stored["model.embed_tokens.weight"].clone()
        elif how == "head":
            stored["lm_head.weight"] = stored.pop("model.embed_tokens.weight")
        save_file(stored, copy / "model.safetensors", metadata={"format": "pt"})
        prints[how] = fingerprint(copy)
        assert _old_fingerprint(base) in fingerprints(copy)
    assert len(set(prints.values())) == 1, prints


def test_files_the_loader_does_not_read_and_buffers_are_not_the_model(tmp_path: Path) -> None:
    """A consolidated.safetensors beside the weights (mistralai repos ship both) and saved
    rotary buffers leave the fingerprint and the linears as they are."""
    base = build_base(tmp_path / "base", "mistral")
    before = read_base_model(base)
    copy = shutil.copytree(base, tmp_path / "copy")
    tensors = load_file(copy / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    consolidated = {"layers.0.attention.wq.weight": torch.zeros(64, 64)}
    save_file(consolidated, copy / "consolidated.safetensors")
    after = read_base_model(copy)
    assert after.fingerprint == before.fingerprint
    assert after.linears == before.linears
    # A stray file that is not even readable is not read at all.
    (copy / "consolidated.safetensors").write_text(LFS_POINTER)
    assert fingerprint(copy) == before.fingerprint


def test_the_fingerprints_read_each_header_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The current fingerprint and the stored and loaded sets of the legacy ones read the same
    files: each header is read once for all of them (it was read three times at serve start)."""
    import mintvcs.base

    base = build_base(tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for shard, held in shards.items():
        save_file({n: tensors[n] for n in held}, base / shard, metadata={"format": "pt"})
    weight_map = {n: shard for shard, held in shards.items() for n in held}
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    expected = (fingerprint(base), *legacy_fingerprints(base))
    reads: list[str] = []

    def counted(path: Path) -> dict[str, Any]:
        reads.append(Path(path).name)
        return safetensors_header(path)

    monkeypatch.setattr(mintvcs.base, "safetensors_header", counted)
    assert fingerprints(base) == tuple(dict.fromkeys(expected))
    assert sorted(reads) == sorted(shards), reads


def test_another_shape_is_still_another_base(tmp_path: Path) -> None:
    """Normalising must not merge models of different shapes."""
    one = build_base(tmp_path / "one")  # 4 heads, 2 KV heads
    more_kv = build_base(tmp_path / "two", num_key_value_heads=4)
    assert fingerprint(one) != fingerprint(more_kv)
    assert not set(fingerprints(one)) & set(fingerprints(more_kv))


def _bad_weights(tmp_path: Path, name: str, content: bytes) -> Path:
    base = build_base(tmp_path / name)
    (base / "model.safetensors").write_bytes(content)
    return base


def test_an_lfs_pointer_is_named_as_one(tmp_path: Path) -> None:
    """A clone without git-lfs: the weights file is a 130-byte pointer, not 'out of memory'."""
    base = _bad_weights(tmp_path, "lfs", LFS_POINTER.encode())
    with pytest.raises(
        BaseModelError, match=r"model\.safetensors is a Git LFS pointer.*git lfs pull"
    ):
        read_base_model(base)


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (struct.pack("<Q", 5000) + b"{}", "past the end of the file"),
        (struct.pack("<Q", 2**62) + b"x" * 64, "more than safetensors allows"),
        (struct.pack("<Q", 30) + b'{"a": {"dtype": "F32", "sha', "past the end of the file"),
        (struct.pack("<Q", 12) + b'{"a": {"dtyp', "does not parse"),
        (struct.pack("<Q", 9) + b'{"a": [1]}', "does not parse"),
        (struct.pack("<Q", 2) + b"[]", "does not parse"),
        (struct.pack("<Q", 1) + b"7", "a JSON int, not an object"),
        (struct.pack("<Q", 40) + b'{"a": {"dtype": "F32", "shape": [true]}}', "has no shape"),
        (struct.pack("<Q", 21) + b'{"a": {"shape": [1]}}', "has no dtype"),
        (b"\x01\x02", "truncated"),
    ],
)
def test_a_damaged_header_is_a_clear_error_naming_the_file(
    tmp_path: Path, content: bytes, why: str
) -> None:
    """A truncated or damaged download: bounded by the file size, parse errors caught."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=why) as info:
        safetensors_header(path)
    assert str(path) in str(info.value)


def test_no_error_text_is_empty() -> None:
    """serve's 'the base model failed to load: ' had nothing after it for a MemoryError."""
    assert "out of memory" in error_text(MemoryError())
    assert error_text(KeyError()) == "KeyError"
    assert error_text(ValueError("bad")) == "bad"


def test_a_config_with_no_attention_head_is_identified_by_its_own_values(tmp_path: Path) -> None:
    """`mintvcs init --base-model` used to die with a ZeroDivisionError traceback on it."""
    from mintvcs import porcelain

    base = build_base(tmp_path / "heads0")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(
        json.dumps({**config, "num_attention_heads": 0, "head_dim": None})
    )
    assert fingerprint(base) in fingerprints(base)
    repo = porcelain.init(tmp_path / "repo", str(base))
    assert repo.base is not None and repo.base.fingerprint == fingerprint(base)
