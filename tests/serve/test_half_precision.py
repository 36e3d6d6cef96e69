"""`--dtype bfloat16` / `float16` on CPU: our forward and LoRA against transformers and PEFT.

Half precision cannot match fp32 within 1e-4, and greedy tokens part ways at near-ties, so the
peers calibrate the tolerance: transformers in the same dtype is the oracle for the base, and with
adapters we must stay as close to PEFT's fp32 result as PEFT in the same dtype stays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, PeftDirSource, SamplingParams
from mintvcs.serve.model import Model, StepBatch

HALF = [(torch.bfloat16, "bfloat16"), (torch.float16, "float16")]


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _peft_model(base: Path, adapter: Path | None, dtype: torch.dtype) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _peer_logits(base: Path, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return _peft_model(base, None, dtype)(torch.tensor([ids])).logits[0].float()


def _peer_prompt_logprobs(
    base: Path, adapter: Path | None, ids: list[int], dtype: torch.dtype
) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1 under PEFT in `dtype`, computed in fp32 from its logits."""
    with torch.no_grad():
        logits = _peft_model(base, adapter, dtype)(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


@pytest.mark.parametrize(("dtype", "name"), HALF)
def test_half_forward_follows_transformers_in_that_dtype(
    tiny_base: Path, dtype: torch.dtype, name: str
) -> None:
    ids = _ids(0, 96)
    model = Model.from_dir(tiny_base, dtype=dtype)
    ours = model.forward(
        StepBatch.build([], [(ids, 0, -1)], model.device),
        model.new_kv_cache(1, 128),
        all_logits=True,
    ).float()
    same, full = _peer_logits(tiny_base, ids, dtype), _peer_logits(tiny_base, ids, torch.float32)
    rounding = (same - full).abs().max().item()  # what the dtype itself costs
    assert rounding > 1e-4, f"{name} is not what the peer computed in"
    # Rounded where transformers rounds: far closer to it than either is to fp32.
    assert (ours - same).abs().max().item() <= 0.25 * rounding


@pytest.mark.parametrize(("dtype", "name"), HALF)
def test_half_engine_with_adapters_stays_as_close_to_fp32_as_peft(
    tiny_base: Path, zoo: dict[str, Path], dtype: torch.dtype, name: str
) -> None:
    ids = _ids(5, 40)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    adapters = ["all-r16", "qv-r8", "all-r4-rslora", "mlp-r2"]
    with Engine(
        tiny_base,
        EngineConfig(dtype=name, max_model_len=128, adapter_slots=len(adapters)),
        source=PeftDirSource({a: zoo[a] for a in adapters}),
    ) as engine:
        done = engine.generate_many([(ids, a, params) for a in adapters], timeout=120)
    without = _peer_prompt_logprobs(tiny_base, None, ids, torch.float32)
    for adapter, completion in zip(adapters, done, strict=True):
        assert completion.prompt_logprobs is not None
        ours = torch.tensor([lp.logprob for lp in completion.prompt_logprobs[1:] if lp is not None])
        exact = _peer_prompt_logprobs(tiny_base, zoo[adapter], ids, torch.float32)
        peer = _peer_prompt_logprobs(tiny_base, zoo[adapter], ids, dtype)
        error = (ours - exact).abs().max().item()
        assert error <= 2 * (peer - exact).abs().max().item(), adapter
        # The adapter moves the logprobs far more than the rounding: a lost update would show.
        assert (exact - without).abs().max().item() > 10 * error, adapter
