"""The base model's identity: an id, a fingerprint, and the shapes adapters must fit."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mintvcs.checkpoint import (
    CheckpointError,
    architecture,
    resolved_heads,
    safetensors_files,
    safetensors_header,
)
from mintvcs.errors import MintError

# Config keys that change what an adapter attaches to; the rest (dtype, ids) do not.
_SHAPE_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip
# The shape fields kept as integers when the architecture is one the server resolves.
_RESOLVED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip
_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$"
)
# The decoder-layer list PEFT's layer_replication rebuilds (model.layers, encoder.layer, h).
_LAYER_LIST = re.compile(r"^(?P<head>(?:.*\.)?(?:layers|layer|h))\.(?P<index>\d+)(?P<tail>\..+)$")
# The input embedding a tied lm_head shares its matrix with (a tied checkpoint saves only it).
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings")


class BaseModelError(MintError):
    """A base model directory that cannot be read, or an adapter that does not fit it."""


@dataclass(frozen=True)
class BaseModel:
    """What a repository knows of its base: id, fingerprint and linear shapes ([out, in])."""

    model_id: str
    fingerprint: str | None = None
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON form stored in the repository."""
        return {
            "id": self.model_id,
            "fingerprint": self.fingerprint,
            "linears": {name: list(shape) for name, shape in sorted(self.linears.items())},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BaseModel:
        """Read the JSON form."""
        linears = {name: (int(s[0]), int(s[1])) for name, s in data.get("linears", {}).items()}
        return cls(str(data["id"]), data.get("fingerprint"), linears)

    def check_adapter(
        self,
        tensors: dict[str, tuple[str, tuple[int, ...]]],
        config: Mapping[str, Any] | None = None,
    ) -> None:
        """Refuse LoRA tensors whose shapes do not fit this base's linears as PEFT attaches them under `config`."""
        if not self.linears:
            return
        config = config if isinstance(config, Mapping) else {}
        replicated = _replicated_layers(config.get("layer_replication"))
        for name, (_dtype, shape) in sorted(tensors.items()):
            match = _LORA_NAME.match(name)
            if not match:
                continue
            module, kind = match["module"], match["kind"]
            linear = self._linear(_base_module(module, replicated))
            if linear is None:
                raise BaseModelError(
                    f"tensor {name} targets {module}, which base model {self.model_id} does not have "
                    "(an adapter for another base model?)"
                )
            out_features, in_features = linear
            if len(shape) != 2:
                raise BaseModelError(f"tensor {name} has shape {list(shape)}; LoRA factors are 2-D")
            if kind == "A":
                # BD-LoRA saves a block-diagonal lora_A as its blocks, stacked: [r, in / nblocks].
                in_features //= bdlora_blocks(config, module)[0]
            fits = shape[1] == in_features if kind == "A" else shape[0] == out_features
            if not fits:
                want = f"[r, {in_features}]" if kind == "A" else f"[{out_features}, r]"
                raise BaseModelError(
                    f"tensor {name} has shape {list(shape)} but base model {self.model_id} needs {want} "
                    f"for {module} (an adapter for another base model?)"
                )

    def _linear(self, module: str) -> tuple[int, int] | None:
        """The [out, in] shape of the base's `module`; None if the base has none."""
        shape = self.linears.get(module)
        if shape is None and module.rsplit(".", 1)[-1] == "lm_head":
            # A tied base saves no lm_head.weight: its output layer is the input embedding's
            # [vocab, hidden] matrix, which PEFT adapts as lm_head.
            embeddings = [s for n, s in self.linears.items() if n.rsplit(".", 1)[-1] in _EMBEDDINGS]
            if len(embeddings) == 1:
                shape = embeddings[0]
        return shape


def _replicated_layers(layer_map: Any) -> list[int] | None:
    """The base layer behind each layer of PEFT's layer_replication map; None without one."""
    if not isinstance(layer_map, list) or not layer_map:
        return None
    try:
        return [i for start, end in layer_map for i in range(int(start), int(end))]
    except (TypeError, ValueError):
        return None  # a map PEFT would reject: checked as if there were none


def _base_module(module: str, replicated: list[int] | None) -> str:
    """The base module behind `module`: with layer_replication, layer i is a copy of another."""
    if replicated is None:
        return module
    match = _LAYER_LIST.match(module)
    if match is None or int(match["index"]) >= len(replicated):
        return module  # a layer past the map: no base module, refused as such
    return f"{match['head']}.{replicated[int(match['index'])]}{match['tail']}"


def bdlora_blocks(config: Mapping[str, Any], module: str) -> tuple[int, int]:
    """The number of diagonal blocks of `module`'s lora_A and lora_B under BD-LoRA (1: a full factor)."""
    bd = config.get("use_bdlora")
    if not isinstance(bd, Mapping):
        return 1, 1
    nblocks = bd.get("nblocks")
    if isinstance(nblocks, bool) or not isinstance(nblocks, int) or nblocks < 1:
        return 1, 1
    # PEFT's own test: a pattern is a substring of the module path.
    if any(isinstance(p, str) and p in module for p in bd.get("target_modules_bd_a") or ()):
        return nblocks, 1
    if any(isinstance(p, str) and p in module for p in bd.get("target_modules_bd_b") or ()):
        return 1, nblocks
    return 1, 1


# Reads a safetensors file's header: safetensors_header, or one that keeps what it read.
HeaderReader = Callable[[Path], dict[str, Any]]


def read_base_model(
    directory: Path, model_id: str | None = None, *, header: HeaderReader | None = None
) -> BaseModel:
    """Fingerprint a local HF checkpoint directory from its resolved shape fields and the
    shapes of the tensors the model uses (docs/format.md §5); `header` reads each file's
    header (safetensors_header by default)."""
    header = header or safetensors_header
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BaseModelError(f"{directory} is not a model directory: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise BaseModelError(f"{config_path}: invalid JSON ({err})") from None
    if not isinstance(config, dict):
        raise BaseModelError(f"{config_path} holds a JSON {type(config).__name__}, not an object")
    try:
        files = safetensors_files(directory)
        shapes: dict[str, list[int]] = {}
        for path in files:
            for name, info in header(path).items():
                shapes[name] = info["shape"]
    except CheckpointError as err:
        raise BaseModelError(str(err)) from None
    # Buffers (rotary inverse frequencies) that older conversions saved: no model loads them.
    shapes = {name: shape for name, shape in shapes.items() if not _is_buffer(name)}
    identity = {"config": _shape_config(config), "tensors": _used_tensors(config, shapes)}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    linears = {
        name.removesuffix(".weight"): (int(shape[0]), int(shape[1]))
        for name, shape in shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    }
    return BaseModel(model_id or default_model_id(directory), f"sha256:{digest}", linears)


def default_model_id(directory: Path) -> str:
    """The id a base directory is recorded under: the hub id (org/name) of a Hugging Face hub
    cache snapshot (.../models--org--name/snapshots/REVISION), else the directory's name (of
    its absolute path: `.` is named too); links are not followed, so a link names its target."""
    path = Path(os.path.abspath(directory))
    repo = path.parent.parent.name
    if path.parent.name == "snapshots" and repo.startswith("models--"):
        # The hub refuses "--" in ids, so the cache's "--" separators split it unambiguously.
        parts = repo.removeprefix("models--").split("--")
        if len(parts) <= 2 and all(parts):
            return "/".join(parts)
    return path.name


def _is_buffer(name: str) -> bool:
    """A saved buffer rather than a weight: transformers recomputes it and never loads it."""
    return name.endswith(".rotary_emb.inv_freq") or name == "rotary_emb.inv_freq"


def _shape_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config side of the identity: the shape fields as the server resolves them for an
    architecture it runs (a re-save that writes the implied head_dim changes nothing), else
    config.json's own values."""
    arch = architecture(config)
    if arch is not None:
        try:
            head_dim, kv_heads, _ = resolved_heads(config, arch)
            fields = {key: int(config[key]) for key in _RESOLVED_KEYS}
        except (KeyError, TypeError, ValueError):
            pass  # a config the server refuses: identified by its own values
        else:
            return {"arch": arch, **fields, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    return {key: config.get(key) for key in _SHAPE_KEYS}


def _used_tensors(config: dict[str, Any], shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The tensor side of the identity: name -> shape, a tied head counted once."""
    used = dict(shapes)
    arch = architecture(config)
    if arch is not None:
        # transformers adds the `model.` prefix to a bare decoder's names (layers.0.…).
        used = {
            name
            if name.startswith("model.") or name == "lm_head.weight"
            else f"model.{name}": shape
            for name, shape in used.items()
        }
    if config.get("tie_word_embeddings") and "lm_head.weight" in used:
        # One matrix, stored as the embedding, as the head, or as both: one entry, the
        # embedding's (the architectures the server runs name it model.embed_tokens).
        head = used.pop("lm_head.weight")
        if not any(name.rsplit(".", 2)[-2:-1] in ([e] for e in _EMBEDDINGS) for name in used):
            used["model.embed_tokens.weight" if arch is not None else "lm_head.weight"] = head
    return used


def legacy_fingerprints(directory: Path, *, header: HeaderReader | None = None) -> list[str]:
    """The fingerprints older versions may have recorded for this model: their digest (raw
    shape keys, every tensor of every *.safetensors file) of each stored form of it (head_dim
    and num_key_value_heads written or implied, buffers saved or not, a tied head stored under
    either name or both, files beside the loaded ones or not); empty where none can be read.
    `header` reads each file's header (safetensors_header by default)."""
    directory = Path(directory)
    header = header or safetensors_header
    try:
        config = json.loads((directory / "config.json").read_text())
        raw = {key: config.get(key) for key in _SHAPE_KEYS}
        stored: dict[str, Any] = {}
        try:
            for path in sorted(directory.glob("*.safetensors")):
                for name, info in header(path).items():
                    stored[name] = info["shape"]
        except CheckpointError:  # a file the loader does not read (a stray LFS pointer, say)
            stored = {}
        loaded: dict[str, Any] = {}
        for path in safetensors_files(directory):
            for name, info in header(path).items():
                loaded[name] = info["shape"]
    except (OSError, ValueError, AttributeError, CheckpointError):
        return []
    configs = [raw]
    arch = architecture(config)
    if arch is not None:
        try:
            head_dim, kv_heads, _ = resolved_heads(config, arch)
        except (KeyError, TypeError, ValueError):
            pass
        else:
            for hd in (raw["head_dim"], head_dim, None):
                for kv in (raw["num_key_value_heads"], kv_heads, None):
                    configs.append({**raw, "head_dim": hd, "num_key_value_heads": kv})
    tensor_sets: list[dict[str, Any]] = []
    for shapes in (stored, loaded):
        for kept in (shapes, {n: s for n, s in shapes.items() if not _is_buffer(n)}):
            tensor_sets.append(kept)
            embedding = "model.embed_tokens.weight"
            tied = kept.get("lm_head.weight") or kept.get(embedding)
            if config.get("tie_word_embeddings") and tied is not None:
                rest = {n: s for n, s in kept.items() if n not in ("lm_head.weight", embedding)}
                for names in (("lm_head.weight",), (embedding,), ("lm_head.weight", embedding)):
                    tensor_sets.append({**rest, **dict.fromkeys(names, tied)})
    digests: dict[str, None] = {}
    for cfg in configs:
        for tensors in tensor_sets:
            if tensors:
                identity = {"config": cfg, "tensors": dict(sorted(tensors.items()))}
                text = json.dumps(identity, sort_keys=True).encode()
                digests["sha256:" + hashlib.sha256(text).hexdigest()] = None
    return list(digests)


def fingerprint(directory: Path) -> str:
    """The fingerprint of a local base model directory."""
    fp = read_base_model(directory).fingerprint
    assert fp is not None
    return fp


def fingerprints(directory: Path) -> tuple[str, ...]:
    """Every fingerprint a repository may have recorded for this base: the current one first,
    then those older versions computed (accepted too, so that their repositories stay valid)."""
    # Each file's header read once for all three sets (a large base has hundreds of shards'
    # headers of thousands of entries); a file that fails is not kept, and fails each time.
    header = functools.cache(safetensors_header)
    current = read_base_model(directory, header=header).fingerprint
    assert current is not None
    return tuple(dict.fromkeys([current, *legacy_fingerprints(directory, header=header)]))
