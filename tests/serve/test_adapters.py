"""What the engine refuses to serve, and why; scaling; the store-backed source."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve import (
    AdapterNotFound,
    AdapterRefused,
    AdapterWeights,
    Engine,
    EngineConfig,
    PeftDirSource,
    SamplingParams,
)
from mintvcs.serve.adapters import prepare_adapter
from mintvcs.serve.loader import read_config
from tests.fixtures import make_peft_adapter


def _peft_with(base: Path, out: Path, *, b_std: float = 0.0, **lora: Any) -> Path:
    """A PEFT adapter with arbitrary LoraConfig options (DoRA, modules_to_save, odd targets);
    `b_std` > 0 gives it random lora_B factors, so that it acts."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    lora = {"r": 4, "lora_alpha": 8, **lora}
    peft = get_peft_model(model, LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **lora))
    if b_std:
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape) * b_std)
    peft.save_pretrained(str(out), safe_serialization=True)
    return out


def _peft_logprobs(base: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of PEFT's logits at every position of `ids` [len, vocab]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        return torch.log_softmax(peft(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def _assert_served_as_peft(base: Path, adapters: dict[str, Path]) -> None:
    """Each adapter's greedy tokens and their logprobs, prompt included, equal PEFT's."""
    prompt = torch.randint(3, 384, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(
        max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0
    )
    with Engine(base, EngineConfig(max_model_len=64), source=PeftDirSource(adapters)) as eng:
        for name, adapter in adapters.items():
            done = eng.generate(prompt, name, params, timeout=60)
            ids = prompt + done.token_ids
            expected = _peft_logprobs(base, adapter, ids)
            assert done.token_ids == expected[len(prompt) - 1 : -1].argmax(-1).tolist(), name
            assert done.logprobs is not None and done.prompt_logprobs is not None
            found = [lp.logprob for lp in [*done.prompt_logprobs[1:], *done.logprobs] if lp]
            want = [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))]
            assert found == pytest.approx(want, abs=1e-4), name


def test_a_peft_dir_name_is_never_rebound_to_another_directory(
    tmp_path: Path, zoo: dict[str, Path]
) -> None:
    # A name is a revision id: slots and the prefix cache keep what it gave under that name.
    source = PeftDirSource({"x": zoo["kv-r12"]})
    with pytest.raises(ValueError, match="'x'") as info:
        source.add("x", zoo["qv-r8"])
    assert str(zoo["kv-r12"]) in str(info.value) and str(zoo["qv-r8"]) in str(info.value)
    assert source.directories["x"] == zoo["kv-r12"]
    source.add("x", zoo["kv-r12"])  # the same directory again: nothing changes
    (tmp_path / "link").symlink_to(zoo["kv-r12"])
    source.add("x", tmp_path / "link")  # so is a path to it
    source.add("y", zoo["qv-r8"])
    assert source.resolve("y") == "y"
    assert source.load("x").tensors.keys() != source.load("y").tensors.keys()


@pytest.mark.parametrize("max_bytes", [None, 1])  # read whole, or its header only (too large)
def test_a_corrupt_weights_file_is_named_with_its_revision(
    zoo: dict[str, Path], tmp_path: Path, max_bytes: int | None
) -> None:
    import shutil

    from mintvcs.safetensors_file import CorruptSafetensorsError

    directory = tmp_path / "broken"
    shutil.copytree(zoo["qv-r8"], directory)
    weights = directory / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (1 << 62).to_bytes(8, "little")  # a header length past the file
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptSafetensorsError) as caught:
        PeftDirSource({"broken": directory}).load("broken", max_bytes=max_bytes)
    message = str(caught.value)
    assert "adapter 'broken'" in message and str(weights) in message, message
    assert "not a readable safetensors file" in message


def _load(directory: Path) -> AdapterWeights:
    return PeftDirSource({"x": directory}).load("x")


@pytest.mark.parametrize(
    ("lora", "reason"),
    [
        ({"target_modules": ["q_proj"], "use_dora": True}, "dora"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"target_modules": ["embed_tokens"]}, "embedding_lora"),
        ({"target_modules": ["lm_head"]}, "lm_head_lora"),
        (
            {"target_modules": ["q_proj"], "layer_replication": [[0, 2], [1, 2]]},
            "layer_replication",
        ),
        ({"target_modules": ["q_proj"], "alora_invocation_tokens": [5, 6]}, "alora"),
        (
            {
                "target_modules": ["q_proj", "o_proj"],
                "use_bdlora": {
                    "target_modules_bd_a": ["o_proj"],
                    "target_modules_bd_b": ["q_proj"],
                    "nblocks": 2,
                },
            },
            "bdlora",
        ),
        ({"target_modules": ["q_proj"], "kasa_config": {}}, "kasa"),
        ({"target_modules": ["q_proj"], "monteclora_config": {}}, "monteclora"),
    ],
)
def test_refusals_name_the_reason(
    tiny_base: Path, tmp_path: Path, lora: dict[str, Any], reason: str
) -> None:
    weights = _load(_peft_with(tiny_base, tmp_path / reason, **lora))
    with pytest.raises(AdapterRefused) as info:
        prepare_adapter(weights, read_config(tiny_base), max_rank=16)
    assert info.value.reason == reason
    assert reason.split("_")[0] in str(info.value).lower()
    if reason in ("embedding_lora", "lm_head_lora"):
        # The LoRA factor, not the full base-layer copy PEFT saves beside it.
        assert "lora_" in str(info.value) and "base_layer" not in str(info.value)


@pytest.mark.parametrize("reason", ["modules_to_save", "embedding_lora", "lm_head_lora"])
def test_full_layer_copies_are_refused_for_what_they_are_not_their_size(
    tiny_base: Path, tmp_path: Path, reason: str
) -> None:
    # PEFT saves the whole base layer beside these, larger than any servable adapter of a real
    # base; the refusal must name the cause (the size bound's fix, a larger max rank, is none).
    from mintvcs import porcelain
    from mintvcs.serve import StoreSource

    lora = {
        "modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
        "embedding_lora": {"target_modules": ["q_proj", "embed_tokens"]},
        "lm_head_lora": {"target_modules": ["q_proj", "lm_head"]},
    }[reason]
    adapter = _peft_with(tiny_base, tmp_path / "adapter", **lora)
    with pytest.raises(AdapterRefused) as info:
        PeftDirSource({"x": adapter}).load("x", max_bytes=1)
    assert info.value.reason == reason
    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    commit = porcelain.commit(repo, "m", source=adapter, show_progress=False).commit
    with pytest.raises(AdapterRefused) as info:
        StoreSource(repo).load(commit, max_bytes=1)
    assert info.value.reason == reason
    # For another base, that comes first, whatever the revision's size.
    small = EngineConfig(max_model_len=64, max_lora_rank=1, lora_targets=("q_proj",))
    other = "sha256:" + "1" * 64
    with (
        Engine(tiny_base, small, source=StoreSource(repo.git_dir), base_fingerprint=other) as eng,
        pytest.raises(AdapterRefused) as info,
    ):
        eng.generate([5, 6], commit, SamplingParams(max_tokens=1), timeout=30)
    assert info.value.reason == "base_fingerprint"


# init_lora_weights -> what PEFT does with it when it loads the adapter: redo the init on the
# base weights ("rewrite"), leave the base alone ("plain"), or fail ("error"). PEFT itself is
# asked below; "corda" and "loftq" it cannot load here at all (calibration data, scipy), so
# those are checked by config alone.
_INITS: dict[Any, str] = {
    "pissa": "rewrite",
    "pissa_niter_2": "rewrite",
    "olora": "rewrite",
    "OLoRA": "rewrite",
    True: "plain",
    False: "plain",
    None: "plain",
    "gaussian": "plain",
    "Gaussian": "plain",
    "eva": "plain",
    "orthogonal": "plain",
    "mica": "plain",
    "MICA": "plain",
    "lora_ga": "plain",
    "PISSA": "error",
    "Pissa": "error",
    "pissa_niter_x": "error",
    "pissaX": "error",
    "EVA": "error",
    "LORA_GA": "error",
    "CORDA": "error",
    "LOFTQ": "error",
    "unknown": "error",
    "true": "error",
    2: "error",  # (not 1: a dict key equal to True)
}


@pytest.mark.parametrize("init", list(_INITS), ids=repr)
def test_inits_that_peft_redoes_on_the_base_or_cannot_load_are_refused(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path, init: Any
) -> None:
    import json
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mintvcs.validate import AdapterConfigError, check_lora_config

    adapter = Path(shutil.copytree(peft_adapter, tmp_path / "adapter"))
    config = {
        **json.loads((adapter / "adapter_config.json").read_text()),
        "init_lora_weights": init,
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    try:
        PeftModel.from_pretrained(model, str(adapter))
    except (ValueError, AttributeError):
        peft = "error"
    else:
        rewritten = any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
        peft = "rewrite" if rewritten else "plain"
    assert peft == _INITS[init]  # PEFT's behaviour, as this table (and the engine) has it
    weights = _load(adapter)
    shapes = {name: ("F32", tuple(t.shape)) for name, t in weights.tensors.items()}
    if peft == "plain":
        check_lora_config(config, shapes)
        assert prepare_adapter(weights, read_config(tiny_base), max_rank=16).rank == 8
        return
    # The engine refuses both; a commit only what PEFT cannot load at all.
    fix = "path_initial_model_for_weight_conversion" if peft == "rewrite" else "PEFT cannot load"
    with pytest.raises(AdapterRefused, match=fix) as info:
        prepare_adapter(weights, read_config(tiny_base), max_rank=16)
    assert info.value.reason == "init_lora_weights"
    if peft == "rewrite":
        check_lora_config(config, shapes)
    else:
        with pytest.raises(AdapterConfigError, match="PEFT cannot load"):
            check_lora_config(config, shapes)


@pytest.mark.parametrize(
    ("init", "fix"),
    [("corda", "path_initial_model_for_weight_conversion"), ("loftq", "LoftQ backbone")],
)
def test_corda_and_loftq_are_refused_by_config(
    tiny_base: Path, peft_adapter: Path, init: str, fix: str
) -> None:
    weights = _load(peft_adapter)
    config = {**weights.config, "init_lora_weights": init}
    with pytest.raises(AdapterRefused, match=fix) as info:
        prepare_adapter(
            AdapterWeights(weights.revision, config, weights.tensors),
            read_config(tiny_base),
            max_rank=16,
        )
    assert info.value.reason == "init_lora_weights"


def test_a_pissa_adapter_is_refused_and_its_conversion_served(
    tiny_base: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    lora = LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM"
    )
    peft = get_peft_model(model, lora)
    peft.peft_config[
        "default"
    ].init_lora_weights = True  # the initial adapter, as PEFT's docs save it
    peft.save_pretrained(str(tmp_path / "initial"))
    peft.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, param in peft.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape) * 0.05)
    peft.save_pretrained(str(tmp_path / "pissa"))
    peft.save_pretrained(
        str(tmp_path / "converted"),
        path_initial_model_for_weight_conversion=str(tmp_path / "initial"),
    )
    config = read_config(tiny_base)
    with pytest.raises(AdapterRefused, match="PiSSA") as info:
        prepare_adapter(_load(tmp_path / "pissa"), config, max_rank=16)
    assert info.value.reason == "init_lora_weights"
    assert prepare_adapter(_load(tmp_path / "converted"), config, max_rank=16).rank == 8


def test_velora_is_served_as_the_plain_lora_peft_runs_at_inference(
    tiny_base: Path, tmp_path: Path
) -> None:
    # VeLoRA changes only the backward pass; its saved buffer enters no forward.
    velora = _peft_with(
        tiny_base,
        tmp_path / "velora",
        b_std=0.1,
        target_modules=["q_proj", "v_proj"],
        velora_config={"num_groups": 4},
    )
    assert any("lora_velora_embed" in n for n in _load(velora).tensors)
    _assert_served_as_peft(tiny_base, {"velora": velora})
    # Without velora_config the buffer is an unknown tensor, as any other.
    weights = _load(velora)
    bare = {k: v for k, v in weights.config.items() if k != "velora_config"}
    with pytest.raises(AdapterRefused) as info:
        prepare_adapter(
            AdapterWeights(weights.revision, bare, weights.tensors),
            read_config(tiny_base),
            max_rank=16,
        )
    assert info.value.reason == "unknown_tensor"


def test_lora_alpha_zero_is_scaled_as_peft_scales_it(tiny_base: Path, tmp_path: Path) -> None:
    # lora_alpha=0 switches the adapter off, except for the modules alpha_pattern gives an alpha.
    targets = {"target_modules": ["q_proj", "v_proj"], "lora_alpha": 0}
    _assert_served_as_peft(
        tiny_base,
        {
            "zero": _peft_with(tiny_base, tmp_path / "zero", b_std=0.2, **targets),
            "pattern": _peft_with(
                tiny_base,
                tmp_path / "pattern",
                b_std=0.2,
                alpha_pattern={"q_proj": 16},
                **targets,
            ),
        },
    )


def test_rank_above_max_rank_is_refused(tiny_base: Path, peft_adapter_bf16: Path) -> None:
    with pytest.raises(AdapterRefused, match=r"rank 16 > max_rank 8") as info:
        prepare_adapter(_load(peft_adapter_bf16), read_config(tiny_base), max_rank=8)
    assert info.value.reason == "rank"


def test_adapter_of_another_base_is_refused(
    tiny_base: Path, other_base: Path, tmp_path: Path
) -> None:
    other = make_peft_adapter(other_base, tmp_path / "other")
    with pytest.raises(AdapterRefused, match="another base") as info:
        prepare_adapter(_load(other), read_config(tiny_base), max_rank=16)
    assert info.value.reason == "shape"


def test_a_lora_b_whose_rank_differs_from_lora_a_s_is_refused_by_name(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    # PEFT refuses the file too (a size mismatch in load_state_dict); here it is refused up
    # front, by name, as a shape that does not fit, not left to fail in a later copy.
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_bytes((peft_adapter / "adapter_config.json").read_bytes())
    tensors = load_file(str(peft_adapter / "adapter_model.safetensors"))
    name = sorted(n for n in tensors if "lora_B" in n and "layers.1." in n)[0]
    b = tensors[name]
    tensors[name] = torch.cat([b, torch.zeros(b.shape[0], 1)], dim=1)  # [out, r + 1]
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="size mismatch"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
        PeftModel.from_pretrained(model, str(bad))
    with pytest.raises(AdapterRefused, match=r"layer 1 \w+: A \(\d+, \d+\), B") as info:
        prepare_adapter(_load(bad), read_config(tiny_base), max_rank=16)
    assert info.value.reason == "shape"


def test_other_base_fingerprint_is_refused(tiny_base: Path, peft_adapter: Path) -> None:
    weights = _load(peft_adapter)
    tagged = AdapterWeights(weights.revision, weights.config, weights.tensors, "sha256:" + "0" * 64)
    with pytest.raises(AdapterRefused, match="base_fingerprint") as info:
        prepare_adapter(
            tagged, read_config(tiny_base), max_rank=16, base_fingerprint="sha256:" + "1" * 64
        )
    assert info.value.reason == "base_fingerprint"
    # The same fingerprint is accepted.
    prepare_adapter(
        tagged, read_config(tiny_base), max_rank=16, base_fingerprint="sha256:" + "0" * 64
    )


def test_scaling_alpha_over_r_and_rslora(tiny_base: Path, tmp_path: Path) -> None:
    config = read_config(tiny_base)
    plain = make_peft_adapter(tiny_base, tmp_path / "plain", r=4, alpha=8)
    rs = make_peft_adapter(tiny_base, tmp_path / "rs", r=4, alpha=8, use_rslora=True)
    assert prepare_adapter(_load(plain), config, max_rank=16).scale == 2.0
    assert prepare_adapter(_load(rs), config, max_rank=16).scale == 8 / math.sqrt(4)


def test_engine_fails_the_request_and_keeps_serving(
    tiny_base: Path, tmp_path: Path, peft_adapter: Path
) -> None:
    dora = _peft_with(tiny_base, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    source = PeftDirSource({"dora": dora, "ok": peft_adapter})
    params = SamplingParams(max_tokens=4, temperature=0.0)
    with Engine(tiny_base, EngineConfig(max_model_len=64, adapter_slots=2), source=source) as eng:
        with pytest.raises(AdapterRefused, match="DoRA"):
            eng.generate([5, 6], "dora", params, timeout=30)
        with pytest.raises(AdapterRefused, match="DoRA"):  # known now: refused at submit
            eng.start_many([([5, 6], "dora", params)])
        assert len(eng.generate([5, 6], "ok", params, timeout=30).token_ids) == 4
        assert eng.stats()["loads_failed"] == 1
        assert all(s["refs"] == 0 for s in eng.residency_snapshot()["slots"])


def _committed(tiny_base: Path, adapter: Path, tmp_path: Path) -> tuple[Any, Any, str]:
    """A repository holding `adapter` on main, a StoreSource over it, and main's commit id."""
    from mintvcs import porcelain
    from mintvcs.serve import StoreSource

    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    porcelain.commit(repo, "first", source=adapter, show_progress=False)
    store = StoreSource(repo)
    return repo, store, store.resolve("main")


def test_store_source_serves_a_committed_revision(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    """A revision committed to a mintvcs repository gives the same tokens as its PEFT directory."""
    _repo, store, commit = _committed(tiny_base, peft_adapter, tmp_path)
    assert len(commit) == 40
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, EngineConfig(max_model_len=64, adapter_slots=2), source=store) as eng:
        from_store = eng.generate([5, 6, 7], commit, params, timeout=30).token_ids
        assert eng.residency_snapshot()["slots"][0]["revision"] == commit
    with Engine(
        tiny_base, EngineConfig(max_model_len=64), source=PeftDirSource({"d": peft_adapter})
    ) as eng:
        assert eng.generate([5, 6, 7], "d", params, timeout=30).token_ids == from_store
    # A ref name or an abbreviation is not an id: said so, not read as a corrupt object.
    with Engine(tiny_base, EngineConfig(max_model_len=64), source=store) as eng:
        for spec in ("main", commit[:10]):
            with pytest.raises(AdapterNotFound, match="not a commit id"):
                eng.generate([5, 6, 7], spec, params, timeout=30)


def test_store_source_refuses_a_header_that_disagrees_with_the_manifest(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    """The server reads a revision through its manifest, a checkout through its safetensors
    header: a revision whose two disagree (two tensors' places traded) is refused, not served."""
    from mintvcs.store import CorruptObjectError
    from tests.mintvcs.storekit import commit_with_manifest_files, swap_two_offsets

    repo, store, _ = _committed(tiny_base, peft_adapter, tmp_path)
    hostile = commit_with_manifest_files(repo.work_tree, [], edit_header=swap_two_offsets)
    with pytest.raises(CorruptObjectError, match="disagrees with the manifest"):
        store.load(hostile)


def test_store_source_follows_a_chain_through_its_plane_cache(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    """Each revision a nudge of the last (a training run): loaded in order, each decodes its
    own link over the planes its parent left, to the same tensors as decoding every chain."""
    import shutil

    from mintvcs import porcelain
    from mintvcs.serve import StoreSource
    from tests.mintvcs.storekit import mutate

    work = shutil.copytree(peft_adapter, tmp_path / "adapter")
    repo = porcelain.init(tmp_path / "repo", str(tiny_base), install_hooks=False)
    commits = []
    for i in range(4):
        if i:
            mutate(work, seed=i)
        commits.append(porcelain.commit(repo, f"r{i}", source=work, show_progress=False).commit)
    assert max(r.depth for r in repo.read_revision(commits[-1]).manifest.tensors) == 3
    following, plain = StoreSource(repo.git_dir), StoreSource(repo.git_dir, plane_cache_bytes=0)
    assert plain.repo.plane_cache is None
    for commit in commits:
        got, want = following.load(commit).tensors, plain.load(commit).tensors
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert following.repo.plane_cache.hits > 0


def test_a_revision_larger_than_any_servable_one_is_refused_before_decoding(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    repo, store, commit = _committed(tiny_base, peft_adapter, tmp_path)
    nbytes = repo.read_revision(commit).manifest.nbytes
    with pytest.raises(AdapterRefused, match="more than any adapter") as err:
        store.load(commit, max_bytes=nbytes - 1)
    assert err.value.reason == "too_large"
    assert store.load(commit, max_bytes=nbytes).revision == commit
    # The engine's bound: max_lora_rank on every targeted linear, in the widest dtype.
    small = EngineConfig(max_model_len=64, max_lora_rank=1, lora_targets=("q_proj",))
    with Engine(tiny_base, small, source=store) as eng:
        assert eng.pools.max_revision_bytes < nbytes
        with pytest.raises(AdapterRefused, match="more than any adapter"):
            eng.generate([5, 6], commit, SamplingParams(max_tokens=1), timeout=30)
    # Too large and for another base: the other base is what to fix first.
    other = "sha256:" + "1" * 64
    with (
        Engine(tiny_base, small, source=store, base_fingerprint=other) as eng,
        pytest.raises(AdapterRefused, match="committed against base") as err,
    ):
        eng.generate([5, 6], commit, SamplingParams(max_tokens=1), timeout=30)
    assert err.value.reason == "base_fingerprint"


def test_bias_refusals_go_by_tensors_not_config(tiny_base: Path, tmp_path: Path) -> None:
    # bias="all" on a base without biases saves none: PEFT runs a plain LoRA, and so must we.
    config = read_config(tiny_base)
    plain_bias = _load(
        _peft_with(tiny_base, tmp_path / "all", target_modules=["q_proj"], bias="all")
    )
    assert not any(n.endswith(".bias") for n in plain_bias.tensors)
    assert prepare_adapter(plain_bias, config, max_rank=16).scale == 2.0
    lora_bias = _load(
        _peft_with(tiny_base, tmp_path / "lb", target_modules=["q_proj"], lora_bias=True)
    )
    with pytest.raises(AdapterRefused, match=r"lora_B\.bias") as info:
        prepare_adapter(lora_bias, config, max_rank=16)
    assert info.value.reason == "lora_bias"


def test_trained_base_biases_are_refused(tmp_path: Path) -> None:
    from tests.fixtures import build_base

    qwen = build_base(tmp_path / "qwen2", "qwen2")
    weights = _load(_peft_with(qwen, tmp_path / "qb", target_modules=["q_proj"], bias="all"))
    with pytest.raises(AdapterRefused, match=r"_proj\.bias") as info:
        prepare_adapter(weights, read_config(qwen), max_rank=16)
    assert info.value.reason == "bias"


def test_trainable_tokens_are_refused(tiny_base: Path, tmp_path: Path) -> None:
    weights = _load(
        _peft_with(
            tiny_base, tmp_path / "tt", target_modules=["q_proj"], trainable_token_indices=[1, 2]
        )
    )
    with pytest.raises(AdapterRefused) as info:
        prepare_adapter(weights, read_config(tiny_base), max_rank=16)
    assert info.value.reason == "trainable_tokens"


def test_a_config_without_lora_alpha_is_scaled_as_peft_scales_it(
    tiny_base: Path, tmp_path: Path
) -> None:
    # LoraConfig's default lora_alpha is 8: scale 8 / r (it was taken as r, scale 1).
    weights = _load(make_peft_adapter(tiny_base, tmp_path / "a", r=4, alpha=8))
    config = {k: v for k, v in weights.config.items() if k != "lora_alpha"}
    bare = AdapterWeights(weights.revision, config, weights.tensors)
    assert prepare_adapter(bare, read_config(tiny_base), max_rank=16).scale == 8 / 4


def test_factor_names_as_peft_loads_them(tiny_base: Path, peft_adapter: Path) -> None:
    # `.default.` (a filtered model.state_dict()) is what PEFT loads as the adapter; another
    # adapter name PEFT skips, so serving its factors would disagree with PEFT.
    config = read_config(tiny_base)
    weights = _load(peft_adapter)
    plain = prepare_adapter(weights, config, max_rank=16)

    def renamed(segment: str) -> AdapterWeights:
        tensors = {
            n.replace(".weight", f".{segment}.weight"): t for n, t in weights.tensors.items()
        }
        return AdapterWeights(weights.revision, weights.config, tensors)

    default = prepare_adapter(renamed("default"), config, max_rank=16)
    assert default.weights.keys() == plain.weights.keys()
    assert all(torch.equal(default.weights[k][0], plain.weights[k][0]) for k in plain.weights)
    with pytest.raises(AdapterRefused) as info:
        prepare_adapter(renamed("policy-b"), config, max_rank=16)
    assert info.value.reason == "unknown_tensor"


def test_peft_dir_source_names_what_is_missing(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    import shutil

    from mintvcs.serve.adapters import AdapterNotFound

    parent = tmp_path / "saved"
    shutil.copytree(peft_adapter, parent / "policy-b")
    with pytest.raises(AdapterNotFound, match=r"found policy-b/adapter_config\.json"):
        PeftDirSource({"x": parent}).load("x")


def test_an_engine_closes_the_repository_its_store_source_opened(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    import os

    from mintvcs import maintenance
    from mintvcs.serve import StoreSource

    repo, _store, commit = _committed(tiny_base, peft_adapter, tmp_path)
    maintenance.gc(repo)  # into a pack, which a reader keeps open
    repo.close()

    def open_files() -> set[str]:
        names = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.add(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:  # the listing's own descriptor, closed since
                continue
        return names

    before = open_files()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with Engine(tiny_base, EngineConfig(max_model_len=64), source=StoreSource(repo.git_dir)) as eng:
        eng.generate([5, 6, 7], commit, params, timeout=30)
        assert any(".mint/objects" in f for f in open_files() - before)
    assert not any(".mint/objects" in f for f in open_files() - before)


def test_a_revision_pruned_since_it_was_resolved_is_not_found_and_damage_stays_damage(
    tiny_base: Path, peft_adapter: Path, tmp_path: Path
) -> None:
    from mintvcs import porcelain
    from mintvcs.serve import StoreSource
    from mintvcs.serve.adapters import AdapterNotFound
    from mintvcs.store import CorruptObjectError
    from tests.mintvcs.storekit import copy_adapter, git, loose_path, mutate

    repo, store, first = _committed(tiny_base, peft_adapter, tmp_path)
    work = copy_adapter(peft_adapter, tmp_path / "work")
    mutate(work, seed=3)
    second = porcelain.commit(repo, "second", source=work, show_progress=False).commit
    # Its ref moves away and git prunes it (the server resolved it by id before).
    git(repo.git_dir, "update-ref", "refs/heads/main", first)
    git(repo.git_dir, "reflog", "expire", "--expire=now", "--all")
    git(repo.git_dir, "gc", "--prune=now", "--quiet")
    with pytest.raises(AdapterNotFound, match=f"revision {second[:12]} is not in the repository"):
        store.load(second)
    # A commit that is there with a tensor missing is damage, not "not found".
    work = copy_adapter(peft_adapter, tmp_path / "work3")
    mutate(work, seed=4)
    third = porcelain.commit(repo, "third", source=work, show_progress=False).commit
    blobs = [loose_path(repo.work_tree, t.blob) for t in repo.read_revision(third).manifest.tensors]
    next(path for path in blobs if path.exists()).unlink()  # one only this commit wrote
    with pytest.raises(CorruptObjectError, match="missing from the store"):
        StoreSource(repo.git_dir).load(third)
