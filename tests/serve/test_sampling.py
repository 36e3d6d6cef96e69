"""The sampler and the stop/detokenize logic, on fixed logits."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mintvcs.serve.sampling import InvalidSamplingParams, SamplingParams, find_stop, sample

LOGITS = torch.tensor([0.0, 3.0, 2.9, 1.0, -1.0, 2.0])


def _draws(params: SamplingParams, n: int = 400) -> list[int]:
    gen = params.generator()
    return [sample(LOGITS, params, gen) for _ in range(n)]


def test_greedy_takes_the_argmax() -> None:
    assert sample(LOGITS, SamplingParams(temperature=0.0), None) == 1
    assert set(_draws(SamplingParams(top_k=1, seed=0), 50)) == {1}


def test_seed_reproduces_and_differs() -> None:
    a, b = _draws(SamplingParams(seed=7)), _draws(SamplingParams(seed=7))
    assert a == b
    assert a != _draws(SamplingParams(seed=8))


def test_top_k_and_top_p_cut_the_tail() -> None:
    assert set(_draws(SamplingParams(top_k=2, seed=1))) == {1, 2}
    # Softmax mass of tokens 1 and 2 is about 0.63: top_p=0.6 keeps both, 0.3 keeps only the first.
    assert set(_draws(SamplingParams(top_p=0.6, seed=2))) == {1, 2}
    assert set(_draws(SamplingParams(top_p=0.3, seed=3))) == {1}
    every = set(_draws(SamplingParams(temperature=5.0, seed=4), 2000))
    assert every == set(range(6))


def test_temperature_sharpens() -> None:
    cold = _draws(SamplingParams(temperature=0.1, seed=5))
    hot = _draws(SamplingParams(temperature=2.0, seed=5))
    assert cold.count(1) > hot.count(1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": "3"},
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"top_k": -2},
        {"stop": ("",)},
        {"seed": -1},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(**kwargs)


def test_find_stop() -> None:
    assert find_stop("hello world", ("wor",), 0) == 6
    assert find_stop("hello world", ("xyz", "lo"), 0) == 3
    assert find_stop("hello world", ("lo",), 6) == -1
    assert SamplingParams(stop="x").stop == ("x",)


@pytest.mark.parametrize("style", ["metaspace", "byte-level"])
def test_detokenized_text_is_what_the_prompt_leaves_off(style: str) -> None:
    # vLLM's definition: decode(prompt + output) minus decode(prompt). A SentencePiece-style
    # (Metaspace) decoder drops the space of the first token it decodes, so decoding the output
    # alone would lose the space before the first generated word.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mintvcs.serve.sampling import IncrementalDetokenizer
    from mintvcs.serve.tiny import _TOKENIZER_CORPUS

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tokenizer.train_from_iterator([_TOKENIZER_CORPUS], trainer)
    prompt = tokenizer.encode("The answer is").ids
    output = tokenizer.encode(" yes. Paris", add_special_tokens=False).ids
    expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
    assert expected.startswith(" ")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detok.add(t) for t in output) == expected
