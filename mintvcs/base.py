"""The base model's identity: an id, a fingerprint, and the shapes adapters must fit."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mintvcs.errors import MintError

# Config keys that change what an adapter attaches to; the rest (dtype, ids) do not.
_SHAPE_KEYS = (
    "model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
)  # fmt: skip
_LORA_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$"
)


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

    def check_adapter(self, tensors: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Refuse LoRA tensors whose shapes do not fit this base's linears."""
        if not self.linears:
            return
        for name, (_dtype, shape) in sorted(tensors.items()):
            match = _LORA_NAME.match(name)
            if not match:
                continue
            module, kind = match["module"], match["kind"]
            if module not in self.linears:
                raise BaseModelError(
                    f"tensor {name} targets {module}, which base model {self.model_id} does not have "
                    "(an adapter for another base model?)"
                )
            out_features, in_features = self.linears[module]
            if len(shape) != 2:
                raise BaseModelError(f"tensor {name} has shape {list(shape)}; LoRA factors are 2-D")
            fits = shape[1] == in_features if kind == "A" else shape[0] == out_features
            if not fits:
                want = f"[r, {in_features}]" if kind == "A" else f"[{out_features}, r]"
                raise BaseModelError(
                    f"tensor {name} has shape {list(shape)} but base model {self.model_id} needs {want} "
                    f"for {module} (an adapter for another base model?)"
                )


def _safetensors_header(path: Path) -> dict[str, Any]:
    """Read only the JSON header of a safetensors file."""
    with path.open("rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) != 8:
            raise BaseModelError(f"{path}: truncated safetensors file")
        (length,) = struct.unpack("<Q", raw_len)
        header: dict[str, Any] = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def read_base_model(directory: Path, model_id: str | None = None) -> BaseModel:
    """Fingerprint a local HF checkpoint directory from its config and tensor shapes."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise BaseModelError(f"{directory} is not a model directory: config.json is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise BaseModelError(f"{config_path}: invalid JSON ({err})") from None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BaseModelError(f"{directory} holds no *.safetensors weights")
    shapes: dict[str, list[Any]] = {}
    for path in files:
        for name, info in _safetensors_header(path).items():
            shapes[name] = [info["dtype"], info["shape"]]
    identity = {
        "config": {key: config.get(key) for key in _SHAPE_KEYS},
        # Dtype is not identity: a bf16 and an fp32 copy of one model serve the same adapters.
        "tensors": {name: shape for name, (_dtype, shape) in sorted(shapes.items())},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    linears = {
        name.removesuffix(".weight"): (int(shape[0]), int(shape[1]))
        for name, (_dtype, shape) in shapes.items()
        if name.endswith(".weight") and len(shape) == 2
    }
    return BaseModel(model_id or directory.name, f"sha256:{digest}", linears)


def fingerprint(directory: Path) -> str:
    """The fingerprint of a local base model directory."""
    fp = read_base_model(directory).fingerprint
    assert fp is not None
    return fp
