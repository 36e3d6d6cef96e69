"""What the version-control side and the server agree on about a HF checkpoint directory:
which safetensors files it loads, how their headers read, and how config.json's shape
fields resolve. No torch here: `mintvcs init` reads a base with it."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from mintvcs.errors import MintError, cannot_read

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
# transformers' default num_key_value_heads per architecture (None: as many as attention heads).
DEFAULT_KV_HEADS: dict[str, int | None] = {"llama": None, "mistral": 8, "qwen2": 32}
# safetensors refuses a header over 100 MB: a larger length is damage, not a header to read.
MAX_HEADER_BYTES = 100_000_000
_LFS_POINTER = b"version https://git-lfs"


class CheckpointError(MintError):
    """A checkpoint directory is missing files or holds tensors we cannot use."""


def architecture(raw: dict[str, Any]) -> str | None:
    """The supported architecture a config.json names (by `architectures`, else `model_type`), or None."""
    archs = raw.get("architectures") or []
    if isinstance(archs, list):
        for name in archs:
            if isinstance(name, str) and name in SUPPORTED_ARCHITECTURES:
                return SUPPORTED_ARCHITECTURES[name]
    model_type = raw.get("model_type")
    return model_type if model_type in SUPPORTED_ARCHITECTURES.values() else None


def resolved_heads(raw: dict[str, Any], arch: str) -> tuple[int, int, list[tuple[str, str]]]:
    """(head_dim, num_key_value_heads, implied) as transformers builds `arch` from `raw`;
    `implied` names the fields config.json does not give and where their values came from."""
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    if heads <= 0:  # no head to divide hidden_size among
        raise ValueError(
            f"num_attention_heads must be a positive integer, got {raw['num_attention_heads']!r}"
        )
    implied: list[tuple[str, str]] = []
    head_dim = raw.get("head_dim")
    if not head_dim:
        head_dim = hidden // heads
        implied.append(("head_dim", "hidden_size / num_attention_heads"))
    # An absent key takes the architecture's transformers default (Mistral 8, Qwen2 32,
    # Llama the head count); only an explicit null means one KV head per query head.
    if "num_key_value_heads" in raw:
        kv_heads = raw["num_key_value_heads"]
        kv_heads = heads if kv_heads is None else int(kv_heads)
    else:
        kv_heads = DEFAULT_KV_HEADS[arch] or heads
        implied.append(
            ("num_key_value_heads", f"absent from config.json: transformers' {arch} default")
        )
    return int(head_dim), kv_heads, implied


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON object, or a CheckpointError naming the file and what is wrong with it."""
    try:
        raw = json.loads(path.read_bytes())
    except OSError as err:
        raise CheckpointError(cannot_read(path, err)) from None
    except ValueError as err:  # not JSON, not UTF-8
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, not an object")
    return raw


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or the shards its index names."""
    directory = Path(directory)
    # transformers looks for model.safetensors before the index: where both are there, it loads
    # the single file (the index may be stale), and so must we to serve the same weights.
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        files = sorted({directory / str(name) for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"shards named by {index} are missing: {', '.join(missing)}")
        return files
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(
        f"no *.safetensors in {directory}; convert the checkpoint to safetensors first"
    )


def lfs_pointer_error(path: Path, start: bytes) -> CheckpointError | None:
    """The error for a file whose first bytes `start` are a Git LFS pointer; None for any other."""
    if not start.startswith(_LFS_POINTER):
        return None
    return CheckpointError(
        f"{path} is a Git LFS pointer, not the weights (cloned without git-lfs?): "
        "run `git lfs pull` in that directory"
    )


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (without `__metadata__`), read and checked
    without reading its data; a CheckpointError names the file and what is wrong with it."""
    try:
        with path.open("rb") as handle:
            start = handle.read(len(_LFS_POINTER))
            lfs = lfs_pointer_error(path, start)
            if lfs is not None:
                raise lfs
            raw_len = start[:8]
            size = handle.seek(0, 2)
            handle.seek(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path} is not a safetensors file: truncated ({size} bytes)")
            (length,) = struct.unpack("<Q", raw_len)
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path} is not a safetensors file: its header claims {length} bytes, "
                    f"{'more than safetensors allows' if length > MAX_HEADER_BYTES else 'past the end of the file'} "
                    "(truncated or damaged: download it again)"
                )
            text = handle.read(length)
    except OSError as err:
        raise CheckpointError(cannot_read(path, err)) from None
    try:
        header = json.loads(text)
        if not isinstance(header, dict):
            raise TypeError(f"a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        for name, info in header.items():
            if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
                raise TypeError(f"tensor {name!r:.80} has no dtype")
            shape = info.get("shape")
            if not isinstance(shape, list) or not all(
                isinstance(d, int) and not isinstance(d, bool) for d in shape
            ):
                raise TypeError(f"tensor {name!r:.80} has no shape")
    except (ValueError, TypeError) as err:  # not JSON, not UTF-8, not a header
        raise CheckpointError(
            f"{path} is not a safetensors file: its header does not parse ({err}; "
            "truncated or damaged: download it again)"
        ) from None
    return header
