"""Fixtures for the engine tests: a zoo of PEFT adapters on tiny_base, and engines over them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mintvcs import porcelain
from mintvcs.serve import Engine, EngineConfig, PeftDirSource
from mintvcs.serve.app import BackgroundServer, ServerConfig
from mintvcs.store import Repository
from tests.fixtures import ALL_LINEAR, make_peft_adapter
from tests.serve.http_kit import TOKEN, commit_on, variant

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


@pytest.fixture(scope="module")
def adapters(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, peft_adapter: Path
) -> dict[str, Path]:
    """Adapters of tiny_base: two PEFT-made ones, scaled variants, and a PEFT DoRA one (refused)."""
    root = tmp_path_factory.mktemp("server-adapters")
    out = {
        "a": peft_adapter,
        "b": make_peft_adapter(
            tiny_base,
            root / "b",
            r=4,
            alpha=8,
            target_modules=(
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ),
            seed=5,
            b_std=0.2,
        ),
    }
    for i in range(1, 4):
        out[f"a{i}"] = variant(peft_adapter, root / f"a{i}", 1.0 + i)
    dora = root / "dora"
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_base)),
        LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True, task_type="CAUSAL_LM"
        ),
    )
    model.save_pretrained(str(dora))
    out["dora"] = dora
    return out


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, adapters: dict[str, Path]
) -> Repository:
    """main = a, product-b = b, tag prod = main's first commit, dora = a DoRA revision."""
    repo = porcelain.init(tmp_path_factory.mktemp("server-repo") / "repo", str(tiny_base))
    commit_on(repo, "main", adapters["a"], "adapter a")
    porcelain.tag_create(repo, "prod", "main", message="release")
    commit_on(repo, "product-b", adapters["b"], "adapter b")
    commit_on(repo, "dora", adapters["dora"], "a DoRA adapter")
    porcelain.checkout(repo, "main", force=True)
    return repo


@pytest.fixture(scope="module")
def server(
    repo: Repository, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    """A server on an ephemeral loopback port, with a bearer token for the admin endpoints."""
    key = tmp_path_factory.mktemp("key") / "token"
    key.write_text(TOKEN + "\n")
    config = ServerConfig(
        repo=repo.work_tree or repo.git_dir,
        base_model=tiny_base,
        port=0,
        max_model_len=512,
        max_prompt_bytes=2000,
        max_tokens_limit=400,
        max_loras=4,
        max_rank=16,
        api_key_file=key,
    )
    with BackgroundServer(config) as srv:
        yield srv
