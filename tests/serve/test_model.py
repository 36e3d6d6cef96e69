"""Our forward against transformers on the same weights, in fp32."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve.loader import (
    CheckpointError,
    ModelConfig,
    UnsupportedModelError,
    read_config,
    rope_inv_freq,
    safetensors_files,
)
from mintvcs.serve.model import Model, StepBatch
from mintvcs.serve.tiny import ARCHITECTURES
from tests.fixtures import build_base

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "llama-tied-llama3": ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_SCALING}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-yarn": (
        "qwen2",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        },
    ),
    "mistral-mha-theta": ("mistral", {"num_key_value_heads": 4, "rope_theta": 500000.0}),
}
PROMPT_LEN = 160


def _prompt(seed: int = 0, n: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def _our_logits(directory: Path, ids: list[int]) -> torch.Tensor:
    model = Model.from_dir(directory)
    kv = model.new_kv_cache(1, 256)
    return model.forward(StepBatch.build([], [(ids, 0, -1)], model.device), kv, all_logits=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str, tmp_path: Path) -> None:
    arch, overrides = CASES[case]
    directory = build_base(tmp_path / case, arch, seed=3, **overrides)
    ids = _prompt()
    ours, ref = _our_logits(directory, ids), _hf_logits(directory, ids)
    assert ours.shape == ref.shape == (PROMPT_LEN, 384)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


def test_rope_scaling_is_applied(tmp_path: Path) -> None:
    """Guard against a parity test that passes because scaling is ignored on both sides."""
    plain = build_base(tmp_path / "plain", seed=3)
    scaled = build_base(tmp_path / "scaled", seed=3, rope_scaling=LLAMA3_SCALING)
    ids = _prompt()
    assert (_our_logits(plain, ids) - _our_logits(scaled, ids)).abs().max() > 1e-2


def test_transformers5_rope_parameters_config(tmp_path: Path) -> None:
    """A config written by transformers 5 (rope_parameters, no rope_theta) loads and matches."""
    from transformers import AutoModelForCausalLM

    src = build_base(tmp_path / "old", seed=4, rope_scaling=LLAMA3_SCALING)
    hf = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    new = tmp_path / "new"
    hf.save_pretrained(
        str(new), max_shard_size="100KB"
    )  # also exercises sharded safetensors + index
    raw = json.loads((new / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw
    assert (new / "model.safetensors.index.json").is_file()
    assert read_config(new).rope == read_config(src).rope
    ids = _prompt(1)
    assert torch.allclose(_our_logits(new, ids), _hf_logits(src, ids), atol=1e-4, rtol=0)


# float64 takes the decode attention of other devices and dtypes (SDPA with each KV head's query
# group as its rows) instead of the CPU fp32 one.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_with_cache_matches_full_forward(tiny_base: Path, dtype: torch.dtype) -> None:
    """Prefill then one-token decode steps, two sequences of different lengths, equal the full forward."""
    model = Model.from_dir(tiny_base, dtype=dtype)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    kv = model.new_kv_cache(4, 64)
    a, b = _prompt(5, 20), _prompt(6, 9)
    full_a = model.forward(
        StepBatch.build([], [(a, 0, -1)], model.device), model.new_kv_cache(1, 64), all_logits=True
    )
    full_b = model.forward(
        StepBatch.build([], [(b, 0, -1)], model.device), model.new_kv_cache(1, 64), all_logits=True
    )
    # Prefill the first 12 of a and 5 of b together, then decode both token by token in one batch.
    out = model.forward(StepBatch.build([], [(a[:12], 2, -1), (b[:5], 0, -1)], model.device), kv)
    assert torch.allclose(out[0], full_a[11], atol=1e-5)
    assert torch.allclose(out[1], full_b[4], atol=1e-5)
    for step in range(4):
        ia, ib = 12 + step, 5 + step
        out = model.forward(
            StepBatch.build([(a[ia], ia, 2, -1), (b[ib], ib, 0, -1)], [], model.device), kv
        )
        assert torch.allclose(out[0], full_a[ia], atol=1e-5)
        assert torch.allclose(out[1], full_b[ib], atol=1e-5)


def test_refuses_unsupported_architecture() -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})


def test_refuses_unsupported_rope_type(tmp_path: Path) -> None:
    directory = build_base(tmp_path / "lr", rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        read_config(directory)


def test_checkpoint_files_that_do_not_parse_are_named(tmp_path: Path, tiny_base: Path) -> None:
    # The JSON or safetensors error alone named no file: with a sharded checkpoint, no shard.
    import shutil

    from mintvcs.serve.loader import iter_tensors

    base = Path(shutil.copytree(tiny_base, tmp_path / "base"))
    config = base / "config.json"
    good = config.read_bytes()
    for text, problem in (("{bad", "is not valid JSON (Expecting"), ("[1]", "holds a JSON list")):
        config.write_text(text)
        with pytest.raises(
            CheckpointError, match=f"^{re.escape(str(config))} {re.escape(problem)}"
        ):
            read_config(base)
    config.write_bytes(good)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # cut short
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(weights))} is not a readable safetensors file"
    ):
        list(iter_tensors(base))
    # A clone without git-lfs holds a pointer where the weights should be: say so.
    weights.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 9\n"
    )
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(weights))} is a Git LFS pointer.*git lfs pull"
    ):
        list(iter_tensors(base))


def test_tied_embeddings_share_the_matrix(tmp_path: Path) -> None:
    directory = build_base(tmp_path / "tied", tie_word_embeddings=True)
    plain = Model.from_dir(directory, prepack=False)
    assert plain.lm_head is plain.embed
    packed = Model.from_dir(directory)
    head = packed.lm_head.to_dense() if packed.lm_head.is_mkldnn else packed.lm_head
    assert torch.equal(head, packed.embed)
    assert packed.num_parameters == plain.num_parameters


def _qwen2(**extra: Any) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 64,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "sliding_window": 16,
        **extra,
    }


def test_qwen2_slides_only_from_max_window_layers_on() -> None:
    # transformers' Qwen2 uses the window in layers >= max_window_layers, and only with
    # use_sliding_window: with no such layer, every layer attends in full.
    assert ModelConfig.from_dict(_qwen2()).sliding_window is None
    full = ModelConfig.from_dict(_qwen2(use_sliding_window=True, max_window_layers=4))
    assert full.sliding_window is None
    some = ModelConfig.from_dict(_qwen2(use_sliding_window=True, max_window_layers=2))
    assert some.sliding_window == 16
    # transformers 5 follows layer_types where the config lists them, over max_window_layers.
    listed = _qwen2(use_sliding_window=True, max_window_layers=4)
    listed["layer_types"] = ["full_attention", "sliding_attention"] + ["full_attention"] * 2
    assert ModelConfig.from_dict(listed).sliding_window == 16
    listed = _qwen2(use_sliding_window=True, max_window_layers=0)
    listed["layer_types"] = ["full_attention"] * 4
    assert ModelConfig.from_dict(listed).sliding_window is None


def test_generation_config_eos_ids_join_config_ones(tmp_path: Path) -> None:
    directory = build_base(tmp_path / "gen")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert set(read_config(directory).eos_token_ids) == {2, 7}


def test_generation_config_eos_ids_join_disjoint_config_ones(tmp_path: Path) -> None:
    """generation_config.json's EOS ids add to config.json's, even when they share none."""
    directory = build_base(tmp_path / "gen")
    _edit_config(directory, eos_token_id=2)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7]}))
    assert set(read_config(directory).eos_token_ids) == {2, 7}


def test_trained_positions_follow_rope_scaling() -> None:
    plain = ModelConfig.from_dict(_qwen2(max_position_embeddings=4096))
    assert plain.trained_positions == 4096
    yarn = ModelConfig.from_dict(
        _qwen2(
            max_position_embeddings=4096,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 4096,
            },
        )
    )
    assert yarn.trained_positions == 16384


def test_stray_bias_tensors_are_ignored_as_transformers_ignores_them(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "stray", seed=3)
    weights = load_file(str(directory / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for name, size in (("self_attn.q_proj", 64), ("mlp.up_proj", 128), ("self_attn.o_proj", 64)):
        weights[f"model.layers.0.{name}.bias"] = torch.randn(size, generator=gen)
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    ids = _prompt(n=32)
    # They used to be added (the config asks for no bias, so transformers leaves them out).
    ours, ref = _our_logits(directory, ids), _hf_logits(directory, ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()
    # With the config asking for every bias (Llama's attention_bias and mlp_bias), all are read.
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(
        json.dumps({**config, "attention_bias": True, "mlp_bias": True})
    )
    with pytest.raises(CheckpointError, match=r"k_proj\.bias' missing"):
        Model.from_dir(directory)
    for i in range(config["num_hidden_layers"]):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            group = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            weight = weights[f"model.layers.{i}.{group}.{name}.weight"]
            weights[f"model.layers.{i}.{group}.{name}.bias"] = torch.randn(
                weight.shape[0], generator=gen
            )
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    ours, ref = _our_logits(directory, ids), _hf_logits(directory, ids)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


def _llama(**extra: Any) -> dict[str, Any]:
    return {**_qwen2(), "architectures": ["LlamaForCausalLM"], "model_type": "llama", **extra}


def test_config_defaults_and_refusals_follow_transformers() -> None:
    mistral = {**_llama(), "architectures": ["MistralForCausalLM"], "model_type": "mistral"}
    del mistral["sliding_window"]
    # transformers' defaults for absent keys: Mistral slides over 4096 positions, Llama never.
    assert ModelConfig.from_dict(mistral).sliding_window == 4096
    assert ModelConfig.from_dict(_llama()).sliding_window is None
    assert ModelConfig.from_dict(_llama()).max_position_embeddings == 2048
    assert ModelConfig.from_dict(mistral).max_position_embeddings == 131072
    assert ModelConfig.from_dict(_llama(hidden_act="swish")).arch == "llama"
    both = ModelConfig.from_dict(
        _llama(
            original_max_position_embeddings=32,
            rope_scaling={**LLAMA3_SCALING, "original_max_position_embeddings": 64},
        )
    )
    assert both.rope.original_max_position_embeddings == 32  # the top-level key wins
    without_vocab = _llama()
    del without_vocab["vocab_size"]
    with pytest.raises(UnsupportedModelError, match=r"config\.json lacks 'vocab_size'"):
        ModelConfig.from_dict(without_vocab)
    for scaling in (
        {"rope_type": "linear"},
        {k: v for k, v in LLAMA3_SCALING.items() if k != "low_freq_factor"},
        # transformers refuses yarn without a factor; we used to derive one (docs say refused).
        {"rope_type": "yarn", "original_max_position_embeddings": 16},
    ):
        with pytest.raises(UnsupportedModelError, match=r"rope_scaling of type .* lacks"):
            ModelConfig.from_dict(_llama(rope_scaling=scaling))


def test_tied_config_with_a_different_stored_head_keeps_it_as_transformers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # transformers 5 does not tie a stored lm_head that differs from the embedding (it warns):
    # the logits must still match it, and an equal stored head is still shared.
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "untied", seed=3)
    weights = load_file(directory / "model.safetensors")
    assert not torch.equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    ids = _prompt()
    with caplog.at_level("WARNING", logger="mintvcs.serve"):
        ours = _our_logits(directory, ids)
    assert "differs from its embedding" in caplog.text
    assert torch.allclose(ours, _hf_logits(directory, ids), atol=1e-4, rtol=0)

    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    plain = Model.from_dir(directory, prepack=False)
    assert plain.lm_head is plain.embed


def _edit_config(directory: Path, drop: tuple[str, ...] = (), **changes: Any) -> None:
    """Rewrite directory/config.json with `changes` set and the keys in `drop` removed."""
    path = directory / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    for key in drop:
        config.pop(key, None)
    path.write_text(json.dumps(config))


def _assert_matches_transformers(directory: Path, n: int = PROMPT_LEN) -> None:
    ids = _prompt(n=n)
    ours, ref = _our_logits(directory, ids), _hf_logits(directory, ids)
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-4, rtol=0), (ours - ref).abs().max()


@pytest.mark.parametrize(
    ("scaling", "parameters", "drop"),
    [
        # Kept for transformers 4 and half migrated: the two name other RoPE types.
        ({"type": "linear", "factor": 4.0}, {"rope_type": "default", "rope_theta": 10000.0}, ()),
        # Only rope_parameters gives a theta: transformers takes rope_scaling, theta 10000.
        (
            {"type": "linear", "factor": 2.0},
            {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            ("rope_theta",),
        ),
    ],
)
def test_rope_scaling_beside_rope_parameters_is_read_as_transformers(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    scaling: dict[str, Any],
    parameters: dict[str, Any],
    drop: tuple[str, ...],
) -> None:
    # transformers 5 lets a non-empty rope_scaling replace rope_parameters, and 4 never reads
    # rope_parameters: both serve rope_scaling. Merging the two (rope_parameters' keys winning)
    # gave logits more than 1 away from theirs.
    directory = build_base(tmp_path / "dual", seed=3)
    _edit_config(directory, drop, rope_scaling=scaling, rope_parameters=parameters)
    with caplog.at_level("WARNING", logger="mintvcs.serve"):
        config = read_config(directory)
    assert "both rope_scaling and rope_parameters" in caplog.text
    assert (config.rope.rope_type, config.rope.factor) == ("linear", scaling["factor"])
    assert config.rope.theta == 10000.0
    assert config.trained_positions == 512 * scaling["factor"]
    _assert_matches_transformers(directory)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("given", ["absent", "null"])
def test_num_key_value_heads_default_is_transformers_per_architecture(
    arch: str, given: str
) -> None:
    from transformers import AutoConfig

    raw = {**_qwen2(), "architectures": [ARCHITECTURES[arch]], "model_type": arch}
    raw.update(num_attention_heads=64, hidden_size=256)
    if given == "absent":
        del raw["num_key_value_heads"]
    else:
        raw["num_key_value_heads"] = None
    ours = ModelConfig.from_dict(raw).num_key_value_heads
    # Mistral 8 and Qwen2 32 when the key is absent, the head count for Llama and for null.
    assert ours == ({"mistral": 8, "qwen2": 32}.get(arch, 64) if given == "absent" else 64)
    if arch == "mistral" and given == "null":
        # transformers 5 types Mistral's field as int and refuses null; 4 reads it as the
        # head count, as 5 does for Llama and Qwen2.
        from huggingface_hub.errors import StrictDataclassFieldValidationError

        with pytest.raises(StrictDataclassFieldValidationError, match="num_key_value_heads"):
            AutoConfig.for_model(**raw)
        return
    assert ours == AutoConfig.for_model(**raw).num_key_value_heads


def test_mistral_without_num_key_value_heads_matches_transformers(tmp_path: Path) -> None:
    # The key absent means 8 KV heads for Mistral; we took 16 (the head count), the engine
    # started and every request failed in the forward with a bare shape error.
    directory = build_base(
        tmp_path / "mistral", "mistral", seed=3, hidden_size=128, num_attention_heads=16,
        num_key_value_heads=8,
    )  # fmt: skip
    _edit_config(directory, ("num_key_value_heads",))
    assert read_config(directory).num_key_value_heads == 8
    _assert_matches_transformers(directory, n=32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"intermediate_size": 96},
            r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[128, 64\] in the checkpoint, "
            r"but config\.json makes it \[96, 64\] \(intermediate_size=96, hidden_size=64\)",
        ),
        (
            {"vocab_size": 320},
            r"'model\.embed_tokens\.weight' has shape \[384, 64\] in the checkpoint, "
            r"but config\.json makes it \[320, 64\] \(vocab_size=320, hidden_size=64\)",
        ),
        (
            {"head_dim": 8},
            r"'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \[64, 64\] in the "
            r"checkpoint, but config\.json makes it \[32, 64\] \(num_attention_heads=4 \* "
            r"head_dim=8, hidden_size=64\)",
        ),
    ],
)
def test_tensor_shapes_are_checked_against_config(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    # They were not: the engine started and each request failed in the forward with a torch
    # shape error naming no tensor or field, or (a smaller vocab) served wider logits.
    # transformers refuses these checkpoints at load too.
    directory = build_base(tmp_path / "shape", seed=3)
    _edit_config(directory, **change)
    with pytest.raises(CheckpointError, match=message):
        Model.from_dir(directory)
    with pytest.raises(RuntimeError, match="mismatched"):
        _hf_logits(directory, _prompt(n=8))


def test_defaulted_kv_heads_are_named_when_the_checkpoint_disagrees(tmp_path: Path) -> None:
    directory = build_base(
        tmp_path / "kv", "mistral", seed=3, num_attention_heads=8, num_key_value_heads=2
    )
    _edit_config(directory, ("num_key_value_heads",))
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 64\] in the "
        r"checkpoint, but config\.json makes it \[64, 64\] \(num_key_value_heads=8 \(absent "
        r"from config\.json: transformers' mistral default\) \* head_dim=8, hidden_size=64\)",
    ):
        Model.from_dir(directory)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_checkpoint_written_by_safetensors_save_model_matches_transformers(
    tmp_path: Path, arch: str
) -> None:
    # safetensors' save_model keeps one name per shared tensor, here lm_head.weight: the
    # embedding was reported missing though it is there under the head's name.
    from safetensors.torch import load_file, save_model
    from transformers import AutoModelForCausalLM

    directory = build_base(tmp_path / arch, arch, seed=3, tie_word_embeddings=True)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    save_model(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})
    names = set(load_file(directory / "model.safetensors"))
    assert "lm_head.weight" in names and "model.embed_tokens.weight" not in names
    _assert_matches_transformers(directory)
    assert Model.from_dir(directory, prepack=False).tied_embeddings


def test_head_only_checkpoint_without_tying_says_what_it_found(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "head", seed=3)
    weights = load_file(directory / "model.safetensors")
    del weights["model.embed_tokens.weight"]
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"'model\.embed_tokens\.weight' missing from the checkpoint \(there is an "
        r"lm_head\.weight, but tie_word_embeddings is false\)",
    ):
        Model.from_dir(directory)


@pytest.mark.parametrize("tied", [True, False])
def test_names_without_the_model_prefix_load_as_in_transformers(tmp_path: Path, tied: bool) -> None:
    # Saved from the bare decoder (LlamaModel): transformers adds the `model.` prefix to every
    # name but lm_head's; we refused them as missing.
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "bare", seed=3, tie_word_embeddings=tied)
    weights = load_file(directory / "model.safetensors")
    bare = {name.removeprefix("model."): tensor for name, tensor in weights.items()}
    assert not any(name.startswith("model.") for name in bare)
    save_file(bare, directory / "model.safetensors", metadata={"format": "pt"})
    _assert_matches_transformers(directory)


def test_names_with_and_without_the_model_prefix_mixed_load_as_in_transformers(
    tmp_path: Path,
) -> None:
    # transformers 5 adds the `model.` prefix name by name; we added it only where no name had
    # it, and refused a checkpoint with some names bare as missing tensors.
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "mixed", seed=3)
    weights = load_file(directory / "model.safetensors")
    bare = ("model.embed_tokens.weight", "model.norm.weight")
    mixed = {
        name.removeprefix("model.") if name in bare or ".layers.1." in name else name: tensor
        for name, tensor in weights.items()
    }
    assert "layers.1.mlp.up_proj.weight" in mixed and "model.layers.0.mlp.up_proj.weight" in mixed
    save_file(mixed, directory / "model.safetensors", metadata={"format": "pt"})
    _assert_matches_transformers(directory)
    # Both spellings of one tensor: transformers keeps one of them by sort order; we refuse.
    mixed["model.norm.weight"] = torch.zeros_like(mixed["norm.weight"])
    save_file(mixed, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError,
        match=r"^the checkpoint holds both 'model\.norm\.weight' and 'norm\.weight', which "
        r"transformers reads as one tensor \(adding the 'model\.' prefix\); keep one of them$",
    ):
        Model.from_dir(directory)


def test_peft_model_state_dict_is_refused_naming_its_prefix(tmp_path: Path) -> None:
    # A PeftModel's state dict saved as the base checkpoint (names `base_model.model.…`) was
    # refused as a plain missing tensor; transformers loads none of it (all weights random).
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    directory = build_base(tmp_path / "peft", seed=3)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    peft = get_peft_model(hf, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    state = {name: tensor.contiguous() for name, tensor in peft.state_dict().items()}
    assert all(name.startswith("base_model.model.") for name in state)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    _, info = AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, output_loading_info=True
    )
    assert "model.embed_tokens.weight" in info["missing_keys"]
    with pytest.raises(
        CheckpointError,
        match=r"^tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' missing from the "
        r"checkpoint: its tensor names start with 'base_model\.model\.', as a PEFT model names "
        r"them; save the base model itself \(PEFT's merge_and_unload\(\) returns it, any LoRA "
        r"merged in\) with save_pretrained and serve that$",
    ):
        Model.from_dir(directory)
    # The advice given works: the merged model saved so loads, equal to transformers.
    merged = tmp_path / "merged"
    peft.merge_and_unload().save_pretrained(str(merged))
    _assert_matches_transformers(merged)


def test_single_file_beside_an_index_is_the_one_loaded_as_in_transformers(
    tmp_path: Path,
) -> None:
    # transformers looks for model.safetensors before model.safetensors.index.json: we read
    # the index's shards (other weights, served without a word) or refused a stale index.
    import shutil

    from transformers import AutoModelForCausalLM

    other = build_base(tmp_path / "other", seed=4)
    directory = tmp_path / "both"
    AutoModelForCausalLM.from_pretrained(str(other), dtype=torch.float32).save_pretrained(
        str(directory), max_shard_size="100KB"
    )
    assert (directory / "model.safetensors.index.json").is_file()
    shutil.copy(build_base(tmp_path / "single", seed=3) / "model.safetensors", directory)
    _assert_matches_transformers(directory)
    # A stale index naming shards that are gone: the single file is still served.
    for shard in directory.glob("model-*.safetensors"):
        shard.unlink()
    _assert_matches_transformers(directory, n=16)


def test_partial_rotary_factor_with_scaled_rope_is_refused() -> None:
    # transformers' scaled RoPE rotates only head_dim * factor dims while the attention rotates
    # the whole head, so transformers fails on these; we served a full-width rotation.
    linear = {"rope_type": "linear", "factor": 2.0}
    for raw in (
        _llama(partial_rotary_factor=0.5, rope_scaling=linear),
        _llama(rope_parameters={**linear, "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
        _llama(partial_rotary_factor=0.5, rope_scaling=LLAMA3_SCALING),
    ):
        with pytest.raises(UnsupportedModelError, match=r"partial_rotary_factor=0\.5 \(in "):
            ModelConfig.from_dict(raw)
    # With default RoPE transformers' Llama family ignores it, and so do we; 1 is no change.
    assert ModelConfig.from_dict(_llama(partial_rotary_factor=0.5)).rope.rope_type == "default"
    one = ModelConfig.from_dict(_llama(partial_rotary_factor=1.0, rope_scaling=linear))
    assert one.rope.factor == 2.0


def test_quantized_checkpoints_are_refused_not_read_as_plain_weights(tmp_path: Path) -> None:
    # An FP8 checkpoint (8-bit weights, their scales in `weight_scale_inv` beside them) loaded
    # with each weight cast to float and the scales dropped: nonsense served without a word.
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "fp8", seed=3)
    weights = load_file(directory / "model.safetensors")
    for name in [n for n in weights if n.endswith("_proj.weight")]:
        weights[name.removesuffix("weight") + "weight_scale_inv"] = torch.ones(1, 1)
        weights[name] = weights[name].to(torch.float8_e4m3fn)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    # Without its quantization_config, the first 8-bit weight the model uses is named.
    with pytest.raises(
        CheckpointError,
        match=r"^tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is stored as "
        r"float8_e4m3fn: quantized weights are not supported; serve the unquantized "
        r"checkpoint \(F32, F16 or BF16 weights\)$",
    ):
        Model.from_dir(directory)
    _edit_config(directory, quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    with pytest.raises(
        UnsupportedModelError,
        match=r"^quantized checkpoints are not supported \(config\.json has a "
        r"quantization_config of quant_method 'fp8'\); serve the unquantized checkpoint",
    ):
        Model.from_dir(directory)


def test_tensors_the_model_does_not_use_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # transformers warns of unused weights too; the logits are still the same as its.
    from safetensors.torch import load_file, save_file

    directory = build_base(tmp_path / "extra", seed=3)
    weights = load_file(directory / "model.safetensors")
    with caplog.at_level("WARNING", logger="mintvcs.serve"):
        Model.from_dir(directory, prepack=False)
    assert "does not use" not in caplog.text
    extra = {f"model.layers.0.extra_{i}": torch.zeros(2) for i in range(6)}
    save_file({**weights, **extra}, directory / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="mintvcs.serve"):
        ours = _our_logits(directory, _prompt())
    assert (
        "the checkpoint holds 6 tensor(s) the model does not use: 'model.layers.0.extra_0', "
        "'model.layers.0.extra_1', 'model.layers.0.extra_2', 'model.layers.0.extra_3', "
        "'model.layers.0.extra_4', ..." in caplog.text
    )
    assert torch.allclose(ours, _hf_logits(directory, _prompt()), atol=1e-4, rtol=0)


def test_a_rope_factor_of_zero_is_refused() -> None:
    """A scaling factor of 0 would divide the frequencies by zero: refused, naming the factor."""
    with pytest.raises(UnsupportedModelError, match="factor must be positive"):
        ModelConfig.from_dict(_llama(rope_scaling={"rope_type": "linear", "factor": 0}))


def test_zero_key_value_heads_are_refused_naming_the_key(tmp_path: Path) -> None:
    """num_key_value_heads 0 is an error naming the key, not a ZeroDivisionError."""
    (tmp_path / "config.json").write_text(json.dumps(_llama(num_key_value_heads=0)))
    with pytest.raises((CheckpointError, UnsupportedModelError), match="num_key_value_heads"):
        read_config(tmp_path)


def test_scaled_positions_are_never_fewer_than_max_position_embeddings() -> None:
    """Yarn stretching 4096 positions 4 times under a max of 32768 (Qwen2.5's) gives 32768."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    config = ModelConfig.from_dict(_qwen2(max_position_embeddings=32768, rope_scaling=yarn))
    assert config.trained_positions == 32768


def test_model_type_alone_names_the_architecture() -> None:
    """A config without architectures is read by its model_type (docs/engine.md)."""
    raw = _qwen2()
    del raw["architectures"]
    assert ModelConfig.from_dict(raw).arch == "qwen2"


def test_the_architectures_list_names_the_architecture_before_model_type() -> None:
    """The first supported name in `architectures` wins; entries that are no name are skipped."""
    raw = _qwen2()
    raw["architectures"] = [None, ["LlamaForCausalLM"], "Qwen2ForCausalLM"]
    raw["model_type"] = "llama"
    assert ModelConfig.from_dict(raw).arch == "qwen2"


def test_architectures_and_model_type_that_disagree_are_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """transformers builds model_type's class, so the served model may differ from its: say so."""
    assert ModelConfig.from_dict(_llama(model_type="qwen2")).arch == "llama"
    assert [r.getMessage() for r in caplog.records] == [
        "config.json's architectures (LlamaForCausalLM) and model_type ('qwen2') disagree: "
        "serving it as llama, as the architectures list says (and vLLM reads it); transformers "
        "builds model_type's class, whose outputs may differ"
    ]
    caplog.clear()
    ModelConfig.from_dict(_llama())
    ModelConfig.from_dict({k: v for k, v in _llama().items() if k != "model_type"})
    assert not caplog.records


def test_rope_parameters_theta_wins_over_a_top_level_one_as_transformers() -> None:
    """A leftover top-level rope_theta yields to rope_parameters' own, as transformers 5 reads it."""
    from transformers import LlamaConfig

    parameters = {"rope_type": "default", "rope_theta": 500000.0}
    hf = LlamaConfig(rope_theta=10000.0, rope_parameters=dict(parameters))
    assert hf.rope_parameters["rope_theta"] == 500000.0
    config = ModelConfig.from_dict(_llama(rope_theta=10000.0, rope_parameters=parameters))
    assert config.rope.theta == 500000.0


@pytest.mark.parametrize(
    "extra",
    [
        {"truncate": False},
        {"mscale": 1.0, "mscale_all_dim": 0.707},  # DeepSeek's: the ratio of the two
        {"beta_slow": 21.0},  # the ramp's ends both clamped to 0: an empty ramp
    ],
    ids=["untruncated", "mscale-ratio", "empty-ramp"],
)
def test_yarn_frequencies_and_scale_are_transformers(extra: dict[str, Any]) -> None:
    """Yarn's inverse frequencies and attention factor equal transformers' for its rarer keys."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "rope_theta": 10000.0,
        **extra,
    }
    raw = _llama(max_position_embeddings=512, rope_parameters=parameters)
    hf = LlamaConfig(**{k: v for k, v in raw.items() if k != "architectures"})
    expected, expected_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    config = ModelConfig.from_dict(raw)
    inv_freq, scale = rope_inv_freq(config.rope, config.head_dim)
    assert torch.allclose(inv_freq, expected.float()) and scale == pytest.approx(expected_scale)


def test_a_missing_shard_is_named_before_any_is_read(tmp_path: Path) -> None:
    """Every shard the index names must be there before the first is read: a missing one is named."""
    (tmp_path / "a.safetensors").write_bytes(b"")
    index = {"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"b\.safetensors"):
        safetensors_files(tmp_path)


def test_an_index_names_each_shard_once_and_must_map_tensors_to_files(tmp_path: Path) -> None:
    """A shard holding many tensors is one file to read; a weight_map that is no object is named."""
    for name in ("a.safetensors", "b.safetensors"):
        (tmp_path / name).write_bytes(b"")
    index = tmp_path / "model.safetensors.index.json"
    mapped = {"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}
    index.write_text(json.dumps({"weight_map": mapped}))
    assert safetensors_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    index.write_text(json.dumps({"weight_map": ["a.safetensors"]}))
    with pytest.raises(CheckpointError, match="has no 'weight_map' object"):
        safetensors_files(tmp_path)


def test_nan_or_infinite_weights_are_warned_of_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers loads them without a word, and so do we, but every output is nonsense:
    the log names the tensors (and a value that only the cast to the served dtype overflows)."""
    import logging

    from safetensors.torch import load_file, save_file

    base = build_base(tmp_path / "base")
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"):
        Model.from_dir(base)
    assert "NaN" not in caplog.text
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 0] = 1e6  # finite in F32, not in F16
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"):
        Model.from_dir(base)
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 1 and "1 tensor(s): 'model.layers.0.mlp.down_proj.weight'" in warned[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mintvcs.serve"):
        Model.from_dir(base, dtype=torch.float16)
    warned = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(warned) == 1 and "2 tensor(s)" in warned[0], warned
    assert "'model.layers.1.self_attn.q_proj.weight' (past the range of float16)" in warned[0]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # transformers divides by zero; we name the field.
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        # transformers refuses a negative layer count; it used to serve a model of no layers.
        ({"num_hidden_layers": -1}, "num_hidden_layers must not be negative, got -1"),
        ({"hidden_size": -64}, "hidden_size must be a positive integer, got -64"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer, got 0"),
        ({"intermediate_size": 0}, "intermediate_size must be a positive integer, got 0"),
        # It used to fail on torch.arange's words, after every tensor was read.
        ({"max_position_embeddings": -5}, "max_position_embeddings must be at least 2, got -5"),
        ({"max_position_embeddings": 1}, "max_position_embeddings must be at least 2, got 1"),
        # transformers refuses it (expected dict); it used to be ignored, with default RoPE.
        ({"rope_scaling": "linear"}, r"rope_scaling must be a JSON object, got a str \('linear'\)"),
        ({"rope_parameters": [1, 2]}, r"rope_parameters must be a JSON object, got a list"),
        # It used to say "architecture 'LlamaForCausalLM' is not supported; the engine runs
        # LlamaForCausalLM, ...".
        (
            {"architectures": "LlamaForCausalLM", "model_type": None},
            "architectures must be a list of class names, got a str",
        ),
    ],
)
def test_config_values_transformers_refuses_are_refused_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    directory = build_base(tmp_path / "base")
    _edit_config(directory, drop=("head_dim",), **changes)
    with pytest.raises(CheckpointError, match=rf"config\.json: {message}"):
        read_config(directory)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # transformers refuses it: RoPE rotates the head's two halves. It used to load, report
        # healthy, and fail every request.
        (
            {"hidden_size": 60, "head_dim": None},
            r"RoPE needs an even head_dim, got head_dim=15 \(hidden_size / num_attention_heads\)",
        ),
        ({"head_dim": 15}, r"RoPE needs an even head_dim, got head_dim=15$"),
        (
            {"hidden_size": 2, "head_dim": None},
            r"head_dim=0 \(hidden_size / num_attention_heads\) must be positive",
        ),
        ({"num_key_value_heads": 0}, "num_key_value_heads=0 must be a positive integer"),
        # Every rotation, and so every output, was NaN.
        ({"rope_theta": 0}, "rope_theta must be positive, got 0.0"),
        ({"rope_theta": -10000}, "rope_theta must be positive, got -10000.0"),
    ],
)
def test_config_shapes_rope_cannot_run_are_refused_naming_the_field(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(UnsupportedModelError, match=message):
        ModelConfig.from_dict(_llama(**changes))


def test_generation_config_eos_ids_that_are_not_token_ids_are_named_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # transformers loads the model with such a file; we used to fail on int()'s words.
    directory = build_base(tmp_path / "gen")
    path = directory / "generation_config.json"
    path.write_text(json.dumps({"eos_token_id": [7, None, "</s>", True, "9"]}))
    assert set(read_config(directory).eos_token_ids) == {2, 7, 9}
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring {path}'s eos_token_id {value}: not a token id"
        for value in ("None", "'</s>'", "True")
    ]


def test_a_generation_config_that_does_not_parse_is_ignored_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # transformers loads the model without it; we used to both warn that we ignore it and refuse
    # to load because of it.
    from mintvcs.serve.app import read_sampling_defaults
    from mintvcs.serve.engine import Engine, EngineConfig

    directory = build_base(tmp_path / "gen")
    (directory / "generation_config.json").write_text("{bad")
    assert read_sampling_defaults(directory) == {}
    with Engine(directory, EngineConfig(max_model_len=64, check_base_fingerprint=False)) as eng:
        assert eng.model.config.eos_token_ids == (2,)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1
    assert re.match(r".*generation_config\.json is not valid JSON \(.*\); ignoring it", warned[0])
