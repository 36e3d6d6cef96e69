"""Fixtures for the engine tests: a zoo of PEFT adapters on tiny_base, and engines over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mintvcs.serve import Engine, EngineConfig, PeftDirSource
from tests.fixtures import ALL_LINEAR, make_peft_adapter

# name -> make_peft_adapter kwargs: different ranks, targets, scalings.
ZOO: dict[str, dict[str, object]] = {
    "qv-r8": {"r": 8, "alpha": 16, "target_modules": ("q_proj", "v_proj"), "seed": 11},
    "all-r16": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR, "seed": 12},
    "all-r4-rslora": {
        "r": 4,
        "alpha": 8,
        "target_modules": ALL_LINEAR,
        "seed": 13,
        "use_rslora": True,
    },
    "mlp-r2": {
        "r": 2,
        "alpha": 4,
        "target_modules": ("gate_proj", "up_proj", "down_proj"),
        "seed": 14,
    },
    "o-r6": {"r": 6, "alpha": 3, "target_modules": ("o_proj",), "seed": 15},
    "kv-r12": {"r": 12, "alpha": 24, "target_modules": ("k_proj", "v_proj"), "seed": 16},
    "qd-r1": {"r": 1, "alpha": 2, "target_modules": ("q_proj", "down_proj"), "seed": 17},
    "attn-r8-a64": {
        "r": 8,
        "alpha": 64,
        "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "seed": 18,
    },
}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """Eight PEFT adapters on tiny_base, made by PEFT."""
    root = tmp_path_factory.mktemp("zoo")
    return {name: make_peft_adapter(tiny_base, root / name, **kw) for name, kw in ZOO.items()}  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def engine(tiny_base: Path, zoo: dict[str, Path]) -> Iterator[Engine]:
    """An engine with as many slots as zoo adapters."""
    with Engine(
        tiny_base,
        EngineConfig(max_batch_size=16, adapter_slots=8, max_model_len=256),
        source=PeftDirSource(zoo),
    ) as eng:
        yield eng
