"""Session-wide fixtures: one tiny base and a few PEFT adapters, built once per run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures import ALL_LINEAR, build_base, make_peft_adapter

# In-process commits (the Python API's tests) take the identity of whoever runs the tests; where
# that has none, an email git would accept, not one made up from a host name without a domain,
# which git and mintvcs refuse. Subprocess tests set their own (storekit.ENV).
if not os.environ.get("EMAIL", "").strip():
    os.environ["EMAIL"] = "tester@example.com"


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama checkpoint directory."""
    return build_base(tmp_path_factory.mktemp("base") / "tiny-llama")


@pytest.fixture(scope="session")
def other_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama of another shape: adapters for it must be refused by stores of tiny_base."""
    return build_base(tmp_path_factory.mktemp("base") / "other-llama", hidden_size=96, seed=7)


@pytest.fixture(scope="session")
def peft_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A fp32 PEFT LoRA on q/v of tiny_base."""
    return make_peft_adapter(tiny_base, tmp_path_factory.mktemp("adapters") / "qv-r8")


@pytest.fixture(scope="session")
def peft_adapter_bf16(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """A bf16 PEFT LoRA on all linears of tiny_base."""
    import torch

    return make_peft_adapter(
        tiny_base,
        tmp_path_factory.mktemp("adapters") / "all-r16-bf16",
        r=16,
        alpha=32,
        target_modules=ALL_LINEAR,
        seed=2,
        dtype=torch.bfloat16,
    )
