"""A PEFT adapter directory on disk: its config, its safetensors weights and any extra files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mintvcs.errors import MintError
from mintvcs.safetensors_file import SafetensorsLayout, read_layout

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
GIT_DIR = ".mint"
# Files a PEFT save may write that we must not take for adapter content.
_IGNORED = {GIT_DIR, ".git", "__pycache__", ".DS_Store"}


class NotAnAdapterError(MintError):
    """A directory that is not a PEFT LoRA adapter in safetensors form."""


@dataclass(frozen=True)
class AdapterFiles:
    """The parsed content of a PEFT adapter directory."""

    root: Path
    config_bytes: bytes
    config: dict[str, Any]
    layout: SafetensorsLayout
    weights: bytes  # the whole adapter_model.safetensors
    extra_files: dict[str, tuple[bytes, bool]]  # relative path -> (content, executable)

    def tensor_bytes(self, index: int) -> memoryview:
        """The raw bytes of the index-th tensor of the layout."""
        entry = self.layout.tensors[index]
        offset = len(self.layout.header)
        return memoryview(self.weights)[offset + entry.start : offset + entry.end]


def read_adapter(root: Path) -> AdapterFiles:
    """Read and validate a PEFT adapter directory."""
    root = Path(root)
    if not root.is_dir():
        raise NotAnAdapterError(f"{root} is not a directory")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise NotAnAdapterError(f"{root} is not a PEFT adapter: {CONFIG_FILE} is missing")
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin found: save with safe_serialization=True)"
            if (root / "adapter_model.bin").exists()
            else ""
        )
        raise NotAnAdapterError(f"{root} is not a PEFT adapter: {WEIGHTS_FILE} is missing{hint}")
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise NotAnAdapterError(f"{config_path}: invalid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise NotAnAdapterError(
            f"{config_path}: peft_type {kind!r} is not supported; mintvcs stores LoRA adapters"
        )
    layout, weights = read_layout(weights_path)
    return AdapterFiles(root, config_bytes, config, layout, weights, _extra_files(root))


def _extra_files(root: Path) -> dict[str, tuple[bytes, bool]]:
    """Every regular file besides the config and weights, by relative posix path."""
    extra: dict[str, tuple[bytes, bool]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED)
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            rel = path.relative_to(root).as_posix()
            if rel in (CONFIG_FILE, WEIGHTS_FILE) or filename in _IGNORED or path.is_symlink():
                continue
            extra[rel] = (path.read_bytes(), os.access(path, os.X_OK))
    return extra
