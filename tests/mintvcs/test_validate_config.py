"""check_lora_config and the base check: adapters PEFT saved (and loads on their base) pass;
configs PEFT would misread, and adapters of another base, are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.errors import MintError
from mintvcs.validate import AdapterConfigError, check_lora_config, validate_adapter

CONFIG = "adapter_config.json"
PREFIX = "base_model.model.model.layers"
Q_A = f"{PREFIX}.0.self_attn.q_proj.lora_A.weight"
Q_B = f"{PREFIX}.0.self_attn.q_proj.lora_B.weight"
V_A = f"{PREFIX}.0.self_attn.v_proj.lora_A.weight"
Shapes = dict[str, tuple[str, tuple[int, ...]]]

# LoraConfig options of the adapters PEFT itself saves in these tests, by name.
KINDS: dict[str, dict[str, Any]] = {
    "qv": {"target_modules": ["q_proj", "v_proj"]},
    "dora": {"target_modules": ["q_proj", "v_proj"], "use_dora": True},
    "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
    "layers": {
        "target_modules": ["q_proj", "down_proj"],
        "layers_to_transform": [1],
        "layers_pattern": "layers",
    },
    # lm_head and a module named by its whole path get a LoRA whatever layers_to_transform says.
    "layers_by_path": {
        "target_modules": ["q_proj", "lm_head", "model.layers.1.self_attn.v_proj"],
        "layers_to_transform": [0],
    },
    "rank_pattern": {
        "target_modules": ["q_proj", "v_proj"],
        "rank_pattern": {"v_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
    },
    "all_linear": {"target_modules": "all-linear"},
    "regex": {"target_modules": r".*\.(q|k)_proj"},
    "bias": {"target_modules": ["q_proj"], "bias": "lora_only"},
    "lora_bias": {"target_modules": ["q_proj"], "lora_bias": True},
    "parameters": {"target_modules": [], "target_parameters": ["q_proj.weight"]},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> dict[str, Path]:
    """One rank-4 adapter per KINDS entry, each made and saved by PEFT on the tiny base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-kinds")
    out: dict[str, Path] = {}
    for kind, options in KINDS.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **options)
        get_peft_model(model, config).save_pretrained(str(root / kind), safe_serialization=True)
        out[kind] = root / kind
    return out


def edited(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of adapter `src` whose config has `changes` applied (a value of ... deletes the key)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / CONFIG).read_text())
    for key, value in changes.items():
        if value is ...:
            del config[key]
        else:
            config[key] = value
    (dst / CONFIG).write_text(json.dumps(config))
    return dst


def refusal(adapter: Path) -> str:
    """The message validate_adapter refuses `adapter` with."""
    with pytest.raises(AdapterConfigError) as info:
        validate_adapter(adapter, None)
    return str(info.value)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_adapters_peft_saved_pass(saved: dict[str, Path], kind: str) -> None:
    validate_adapter(saved[kind], None)


def test_all_linear_shorthand_accepts_every_linear(saved: dict[str, Path], tmp_path: Path) -> None:
    # PEFT saves the expanded list; a config written by hand keeps the shorthand.
    validate_adapter(edited(saved["all_linear"], tmp_path / "a", target_modules="ALL-LINEAR"), None)


def test_error_is_a_mint_error() -> None:
    assert issubclass(AdapterConfigError, MintError)


def test_r_mismatch_names_key_tensor_and_fix(saved: dict[str, Path], tmp_path: Path) -> None:
    message = refusal(edited(saved["qv"], tmp_path / "a", r=8))
    assert '"r" is 8' in message
    assert "has rank 4" in message
    assert 'set "r" to 4' in message
    assert "q_proj.lora_A.weight" in message


def test_r_mismatch_is_what_peft_fails_on(
    saved: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """The refused config really breaks PEFT's load: the check is not stricter than PEFT here."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = edited(saved["qv"], tmp_path / "a", r=8)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(model, str(adapter))


@pytest.mark.parametrize("r", [2, 1])
def test_an_r_that_divides_the_rank_is_refused_as_peft_fails_on_it(
    saved: dict[str, Path], tiny_base: Path, tmp_path: Path, r: int
) -> None:
    """An "r" below the factors' rank 4 that divides it: PEFT makes rank-r layers and fails to
    load the rank-4 factors, so commit must refuse it (only a LoRA on parameters stacks
    rank-r blocks)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = edited(saved["qv"], tmp_path / "a", r=r)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(model, str(adapter))
    message = refusal(adapter)
    assert f'"r" is {r} but' in message and "has rank 4" in message


def test_init_lora_weights_peft_cannot_load_is_refused_even_without_verify(
    saved: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    from mintvcs import porcelain

    message = refusal(edited(saved["qv"], tmp_path / "a", init_lora_weights="PISSA"))
    assert 'init_lora_weights is "PISSA", which PEFT cannot load' in message
    assert 'write "pissa"' in message
    assert "write true" in refusal(edited(saved["qv"], tmp_path / "b", init_lora_weights="svd"))
    # A commit checks the config like the base's shapes, --no-verify or not (what PEFT itself
    # says of these is asked in tests/serve/test_adapters.py).
    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    with pytest.raises(AdapterConfigError, match="PEFT cannot load"):
        porcelain.commit(repo, "m", source=tmp_path / "a", verify=False, show_progress=False)
    valid = edited(saved["qv"], tmp_path / "c", init_lora_weights="pissa")  # PEFT loads it
    porcelain.commit(repo, "m", source=valid, verify=False, show_progress=False)


def test_the_validator_run_as_a_program_checks_the_repositorys_base(
    tiny_base: Path, other_base: Path, tmp_path: Path
) -> None:
    # What an edited pre-commit hook runs (`python -m mintvcs.validate` with MINT_DIR): the
    # shapes are checked against the repository's base too, not only the config.
    from mintvcs import porcelain
    from mintvcs.base import BaseModelError
    from tests.fixtures import make_peft_adapter

    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    foreign = make_peft_adapter(other_base, tmp_path / "foreign")
    validate_adapter(foreign, None)  # a sound adapter, for another base
    with pytest.raises(BaseModelError):
        validate_adapter(foreign, repo)
    validate_adapter(make_peft_adapter(tiny_base, tmp_path / "ours"), repo)


def test_untargeted_module_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    message = refusal(edited(saved["qv"], tmp_path / "a", target_modules=["q_proj"]))
    assert '"target_modules" ["q_proj"] does not cover' in message
    assert V_A in message
    assert 'add "v_proj" to target_modules' in message


def test_untargeted_weights_are_what_peft_ignores(
    saved: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """PEFT loads the refused adapter but leaves v_proj without a LoRA: its weights are lost."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = edited(saved["qv"], tmp_path / "a", target_modules=["q_proj"])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(model, str(adapter))
    names = [name for name, _ in loaded.named_parameters()]
    assert any("q_proj.lora_A" in name for name in names)
    assert not any("v_proj.lora_A" in name for name in names)


def test_regex_target_must_fully_match(saved: dict[str, Path], tmp_path: Path) -> None:
    # "q_proj" alone is a regex that matches no full module path.
    message = refusal(edited(saved["regex"], tmp_path / "a", target_modules="q_proj"))
    assert "regex 'q_proj' does not fully match model.layers.0.self_attn.k_proj" in message


def test_a_regex_target_matching_inside_the_path_is_refused_as_peft_ignores_it(
    saved: dict[str, Path], tiny_base: Path, tmp_path: Path
) -> None:
    """PEFT matches a regex target_modules against the whole module path (re.fullmatch): one
    that only occurs inside the path targets nothing, and PEFT loads none of the factors."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = edited(saved["regex"], tmp_path / "a", target_modules="(q|k)_proj")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    with pytest.raises(ValueError, match="not found in the base model"):
        PeftModel.from_pretrained(model, str(adapter))
    message = refusal(adapter)
    assert "regex '(q|k)_proj' does not fully match model.layers.0.self_attn." in message


def test_layers_to_transform_must_cover_the_layer(saved: dict[str, Path], tmp_path: Path) -> None:
    message = refusal(edited(saved["layers"], tmp_path / "a", layers_to_transform=[0]))
    assert '"layers_to_transform" is [0]' in message
    assert "is in layer 1" in message
    assert "layers.1.mlp.down_proj.lora_A.weight" in message


@pytest.mark.parametrize(
    ("targets", "layers", "key"),
    [
        (["q_proj"], [0], "model.layers.0.self_attn.q_proj"),
        (["q_proj"], [1], "model.layers.0.self_attn.q_proj"),
        # The first number after a dotted name is the layer, not the expert's index.
        (["down_proj"], [1], "model.layers.1.mlp.experts.0.down_proj"),
        (["down_proj"], [0], "model.layers.1.mlp.experts.0.down_proj"),
        # A module with no layer index is in no layer PEFT transforms, unless listed by its
        # whole path: PEFT applies layers_to_transform only to modules it matched by suffix.
        (["q_proj", "linear"], [0], "model.projector.linear"),
        (["q_proj", "lm_head"], [0], "lm_head"),
        (["q_proj", "lm_head"], 0, "lm_head"),
        (["model.layers.1.self_attn.v_proj"], [0], "model.layers.1.self_attn.v_proj"),
        (["self_attn.v_proj"], [0], "model.layers.1.self_attn.v_proj"),
    ],
)
def test_layers_to_transform_reads_the_layer_index_as_peft_does(
    targets: list[str], layers: int | list[int], key: str
) -> None:
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    options = {"target_modules": targets, "layers_to_transform": layers}
    peft_targets = bool(check_target_module_exists(LoraConfig(r=4, **options), key))
    module = f"base_model.model.{key}"
    tensors: Shapes = {
        f"{module}.lora_A.weight": ("F32", (4, 64)),
        f"{module}.lora_B.weight": ("F32", (64, 4)),
    }
    try:
        check_lora_config({"peft_type": "LORA", "r": 4, **options}, tensors)
        accepted = True
    except AdapterConfigError as err:
        assert '"layers_to_transform"' in str(err)
        accepted = False
    assert accepted == peft_targets


def test_layers_pattern_without_layers_to_transform_is_refused_as_peft_refuses_it() -> None:
    from peft import LoraConfig

    options: dict[str, Any] = {"target_modules": ["q_proj"], "layers_pattern": "layers"}
    with pytest.raises(ValueError, match="layers_to_transform"):
        LoraConfig(r=4, **options)
    tensors: Shapes = {Q_A: ("F32", (4, 64)), Q_B: ("F32", (64, 4))}
    with pytest.raises(
        AdapterConfigError, match='"layers_pattern" is set but "layers_to_transform"'
    ):
        check_lora_config({"peft_type": "LORA", "r": 4, **options}, tensors)


def test_layers_to_transform_with_regex_targets_is_refused(
    saved: dict[str, Path], tmp_path: Path
) -> None:
    message = refusal(edited(saved["regex"], tmp_path / "a", layers_to_transform=[0]))
    assert '"layers_to_transform" cannot be used with a regex "target_modules"' in message


@pytest.mark.parametrize("key", ["peft_type", "r", "target_modules"])
def test_missing_key_is_named(saved: dict[str, Path], tmp_path: Path, key: str) -> None:
    message = refusal(edited(saved["qv"], tmp_path / "a", **{key: ...}))
    assert f'has no "{key}"' in message


def test_null_target_modules_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    assert 'a null "target_modules"' in refusal(
        edited(saved["qv"], tmp_path / "a", target_modules=None)
    )


@pytest.mark.parametrize("rank", [0, -4, "4", 4.0, True, None])
def test_r_must_be_a_positive_int(saved: dict[str, Path], tmp_path: Path, rank: object) -> None:
    message = refusal(edited(saved["qv"], tmp_path / "a", r=rank))
    assert f'"r" is {json.dumps(rank)}' in message
    assert "integer of at least 1" in message


def test_foreign_config_is_refused(saved: dict[str, Path], tmp_path: Path) -> None:
    adapter = shutil.copytree(saved["qv"], tmp_path / "a")
    (adapter / CONFIG).write_text('{"foo": 1}')
    assert 'has no "peft_type"' in refusal(adapter)
    with pytest.raises(AdapterConfigError, match="peft_type"):
        check_lora_config({"foo": 1}, {})


def test_non_object_config_is_refused() -> None:
    with pytest.raises(AdapterConfigError, match="JSON list, not an object"):
        check_lora_config([1, 2], {})  # type: ignore[arg-type]


def test_other_peft_types_are_left_alone() -> None:
    tensors: Shapes = {Q_A: ("F32", (4, 64)), Q_B: ("F32", (64, 7))}
    check_lora_config({"peft_type": "IA3"}, tensors)


def test_rank_pattern_mismatch(saved: dict[str, Path], tmp_path: Path) -> None:
    message = refusal(
        edited(
            saved["rank_pattern"],
            tmp_path / "a",
            rank_pattern={"v_proj": 3, r"layers\.0\.self_attn\.q_proj": 6},
        )
    )
    assert "\"rank_pattern\"['v_proj'] is 3" in message
    assert "has rank 2" in message
    assert V_A in message
    assert "set \"rank_pattern\"['v_proj'] to 2" in message


def test_dropped_rank_pattern_falls_back_to_r(saved: dict[str, Path], tmp_path: Path) -> None:
    message = refusal(edited(saved["rank_pattern"], tmp_path / "a", rank_pattern={}))
    assert '"r" is 4 but' in message
    assert "has rank 6" in message
    assert 'add "rank_pattern": {"model.layers.0.self_attn.q_proj": 6}' in message


def test_rank_pattern_matches_as_peft_does() -> None:
    # PEFT anchors a pattern at a dot boundary and at the end: "proj" does not match "q_proj".
    tensors: Shapes = {Q_A: ("F32", (2, 64)), Q_B: ("F32", (64, 2))}
    base = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    check_lora_config({**base, "rank_pattern": {"q_proj": 2}}, tensors)
    check_lora_config({**base, "rank_pattern": {r"layers\.\d+\.self_attn\.q_proj": 2}}, tensors)
    with pytest.raises(AdapterConfigError, match='"r" is 4'):
        check_lora_config({**base, "rank_pattern": {"proj": 2}}, tensors)


def test_lora_a_and_b_ranks_must_agree() -> None:
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    disagree: Shapes = {Q_A: ("F32", (4, 64)), Q_B: ("F32", (64, 6))}
    with pytest.raises(AdapterConfigError) as info:
        check_lora_config(config, disagree)
    message = str(info.value)
    assert f"{Q_A} has 4 rows but {Q_B} has 6 columns" in message
    assert '"r"' in message


def test_a_factor_of_one_dimension_is_refused() -> None:
    # What a ZeRO-3 / FSDP shard saved ungathered looks like: PEFT cannot load it.
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterConfigError, match=rf"{Q_A} has shape \[4\]; a LoRA factor"):
        check_lora_config(config, {Q_A: ("F32", (4,)), Q_B: ("F32", (64, 4))})


def test_lone_factor_is_checked_but_allowed() -> None:
    # Not this check's business (PEFT loads it beside a fresh partner), but its rank still counts.
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    check_lora_config(config, {Q_B: ("F32", (64, 4))})
    lone: Shapes = {Q_B: ("F32", (64, 2))}
    with pytest.raises(AdapterConfigError, match=f'"r" is 4 but {Q_B} has rank 2'):
        check_lora_config(config, lone)


def test_excluded_and_saved_modules_cannot_hold_lora() -> None:
    tensors: Shapes = {Q_A: ("F32", (4, 64)), Q_B: ("F32", (64, 4))}
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterConfigError, match='"exclude_modules" excludes'):
        check_lora_config({**config, "exclude_modules": ["q_proj"]}, tensors)
    with pytest.raises(AdapterConfigError, match="\"modules_to_save\" entry 'self_attn'"):
        check_lora_config({**config, "modules_to_save": ["self_attn"]}, tensors)


def test_bad_regex_is_refused_by_key() -> None:
    tensors: Shapes = {Q_A: ("F32", (4, 64)), Q_B: ("F32", (64, 4))}
    config = {"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}
    with pytest.raises(AdapterConfigError, match='"rank_pattern" has an invalid regex'):
        check_lora_config({**config, "rank_pattern": {"q_proj(": 4}}, tensors)
    with pytest.raises(AdapterConfigError, match='"target_modules" has an invalid regex'):
        check_lora_config({**config, "target_modules": "(("}, tensors)


def _shapes(prefix: str, r: int = 4) -> dict[str, tuple[str, tuple[int, ...]]]:
    """q_proj factors of layer 0 under `prefix` naming (`lora_A{prefix}.weight`)."""
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    return {
        f"{module}.lora_A{prefix}.weight": ("F32", (r, 64)),
        f"{module}.lora_B{prefix}.weight": ("F32", (64, r)),
    }


_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}


def test_factors_named_with_peft_default_adapter_are_checked_like_plain_ones() -> None:
    # A filtered model.state_dict() keeps `.default.`; PEFT loads such names, so the same
    # checks apply (they used to be skipped: an r mismatch passed and PEFT then failed).
    check_lora_config(_CONFIG, _shapes(".default"))
    with pytest.raises(AdapterConfigError, match=r"\br\b"):
        check_lora_config({**_CONFIG, "r": 8}, _shapes(".default"))
    with pytest.raises(AdapterConfigError, match="target_modules"):
        check_lora_config({**_CONFIG, "target_modules": ["v_proj"]}, _shapes(".default"))


def test_factors_under_another_adapter_name_are_refused() -> None:
    # PEFT skips them (missing-keys warning, output = base): committing them would store an
    # adapter that does nothing under PEFT.
    with pytest.raises(AdapterConfigError, match="adapter name 'policy-b'"):
        check_lora_config(_CONFIG, _shapes(".policy-b"))
    with pytest.raises(AdapterConfigError, match="same factor"):
        check_lora_config(_CONFIG, {**_shapes(""), **_shapes(".default")})


_BDLORA = {"target_modules_bd_a": ["o_proj"], "target_modules_bd_b": ["q_proj"], "nblocks": 2}
# Adapters PEFT makes and loads on their own base although not every factor is [r, in] /
# [out, r] on a linear of the base checkpoint: (tied base?, LoraConfig options).
SAME_BASE: dict[str, tuple[bool, dict[str, Any]]] = {
    # A tied checkpoint saves no lm_head.weight: lm_head is the embedding's matrix.
    "lm_head_on_tied_base": (True, {"target_modules": ["q_proj", "lm_head"]}),
    # PEFT ties lm_head's LoRA to the embedding's, and saves it, with lm_head in no target.
    "ensure_weight_tying": (
        True,
        {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True},
    ),
    # Three layers, copies of base layers [0, 1, 1].
    "layer_replication": (
        False,
        {"target_modules": ["q_proj"], "layer_replication": [[0, 2], [1, 2]]},
    ),
    # o_proj's lora_A is [r, in / 2], q_proj's lora_B [out, r / 2]: their diagonal blocks.
    "bd_lora": (False, {"target_modules": ["q_proj", "o_proj"], "use_bdlora": _BDLORA}),
}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings (no lm_head.weight in its checkpoint)."""
    from tests.fixtures import build_base

    return build_base(tmp_path_factory.mktemp("tied") / "tied-llama", tie_word_embeddings=True)


def _peft_saved(base: Path, out: Path, options: dict[str, Any]) -> Path:
    """A rank-4 adapter PEFT makes on `base`, after checking that PEFT loads it back there."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **options)
    get_peft_model(model, config).save_pretrained(str(out), safe_serialization=True)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out))
    return out


@pytest.mark.parametrize("kind", sorted(SAME_BASE))
def test_adapters_peft_loads_on_the_base_are_committed(
    tiny_base: Path, tied_base: Path, tmp_path: Path, kind: str
) -> None:
    from mintvcs import porcelain
    from mintvcs.adapter import read_adapter

    tied, options = SAME_BASE[kind]
    base = tied_base if tied else tiny_base
    adapter = _peft_saved(base, tmp_path / kind, options)
    # The sample pre-commit hook runs too: validate_adapter holds the same checks.
    repo = porcelain.init(tmp_path / "repo", str(base))
    commit = porcelain.commit(repo, kind, source=adapter, show_progress=False).commit
    stored = {t.name for t in repo.read_revision(commit).manifest.tensors}
    assert stored == {t.name for t in read_adapter(adapter).layout.tensors}


@pytest.mark.parametrize(
    ("kind", "change"),
    [("layer_replication", {"layer_replication": ...}), ("bd_lora", {"nblocks": 4})],
)
def test_the_base_check_follows_the_config(
    tiny_base: Path, tmp_path: Path, kind: str, change: dict[str, Any]
) -> None:
    # The same tensors under a config that attaches them otherwise do not fit the base.
    from mintvcs import porcelain
    from mintvcs.base import BaseModelError

    adapter = _peft_saved(tiny_base, tmp_path / kind, SAME_BASE[kind][1])
    if kind == "bd_lora":
        change = {"use_bdlora": {**_BDLORA, **change}}
    adapter = edited(adapter, tmp_path / "edited", **change)
    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    with pytest.raises(BaseModelError, match="another base model"):
        porcelain.commit(repo, kind, source=adapter, show_progress=False)


def test_pattern_keys_match_as_peft_tries_each_regex_in_order() -> None:
    import random
    import re

    from mintvcs.validate import PatternKeys

    def peft(keys: list[str], module: str) -> str | None:  # PEFT's get_pattern_key, as a loop
        return next((k for k in keys if re.match(rf"(.*\.)?({k})$", module)), None)

    rng = random.Random(0)
    parts = ["model", "layers", "0", "1", "12", "mlp", "experts", "q_proj", "up_proj", "x_1"]
    modules = [".".join(rng.choices(parts, k=rng.randint(1, 6))) for _ in range(300)]
    regexes = [r"q_\w+", r"layers\.1.*", "up_proj|q_proj", "1.", "x.1", "(mlp)", ".", "[0-9]+"]
    for _ in range(200):
        keys = [
            rng.choice(regexes)
            if rng.random() < 0.3
            else rng.choice(modules).split(".", rng.randint(0, 2))[-1]
            for _ in range(rng.randint(0, 12))
        ]
        # Dots match any character: a plain key also matches where the module has another.
        keys += [k.replace("_", ".") for k in keys[:2]]
        matcher = PatternKeys(keys)
        for module in modules:
            assert matcher.first(module) == peft(keys, module), (keys, module)


def test_a_key_per_module_is_checked_in_linear_time() -> None:
    import time

    # PEFT's EVA init saves a rank_pattern key per module: thousands for an MoE adapter.
    tensors, pattern = {}, {}
    for layer in range(28):
        for expert in range(60):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                tensors[f"base_model.model.{module}.lora_A.weight"] = ("F32", (4, 64))
                tensors[f"base_model.model.{module}.lora_B.weight"] = ("F32", (64, 4))
                pattern[module] = 4
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["up_proj", "gate_proj", "down_proj"]}
    started = time.process_time()  # CPU time: other jobs on the machine do not count
    check_lora_config({**config, "rank_pattern": pattern}, tensors)
    # 5,040 keys for 5,040 modules took 11 s when each module tried every key's regex.
    assert time.process_time() - started < 5.0
    with pytest.raises(AdapterConfigError, match="rank_pattern"):
        check_lora_config({**config, "rank_pattern": {**pattern, module: 8}}, tensors)


def test_a_target_list_of_every_module_path_is_checked_in_linear_time() -> None:
    import time

    tensors, modules = {}, []
    for layer in range(48):
        for expert in range(128):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                module = f"model.layers.{layer}.mlp.experts.{expert}.{proj}"
                modules.append(module)
                tensors[f"base_model.model.{module}.lora_A.weight"] = ("F32", (4, 64))
                tensors[f"base_model.model.{module}.lora_B.weight"] = ("F32", (64, 4))
    config = {"peft_type": "LORA", "r": 4, "target_modules": modules}
    started = time.process_time()  # CPU time: other jobs on the machine do not count
    check_lora_config(config, tensors)
    assert time.process_time() - started < 5.0  # each module scanned the list: 37k x 18k
    # A suffix after a dot counts, a part of a name does not; exclude_modules alike.
    check_lora_config({**config, "target_modules": ["experts.0.gate_proj", *modules[1:]]}, tensors)
    with pytest.raises(AdapterConfigError, match="does not cover") as err:
        check_lora_config({**config, "target_modules": ["rts.0.gate_proj", *modules[1:]]}, tensors)
    assert len(str(err.value)) < 1000  # the list named, not printed whole
    with pytest.raises(AdapterConfigError, match="exclude_modules"):
        check_lora_config({**config, "exclude_modules": ["17.down_proj"]}, tensors)
