"""The sampler and the stop/detokenize logic, on fixed logits."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
import torch

from mintvcs.serve import sampling
from mintvcs.serve.sampling import (
    CONTEXT_TOKENS,
    InvalidSamplingParams,
    SamplingParams,
    find_stop,
    sample,
    sample_rows,
)

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


def _kept_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the sampler must draw from, by its definition, with a full sort."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept = order[: params.top_k] if params.top_k else order
    keep[kept] = True
    keep &= probs >= params.min_p * probs.max()
    if params.top_p < 1.0:
        ranked = probs[order] * keep[order]
        cum = ranked.cumsum(0) / ranked.sum()
        last = int((cum < params.top_p).sum())
        keep &= probs >= ranked[last]
    out = probs * keep
    return out / out.sum()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=2.0, min_p=0.3),
        SamplingParams(temperature=1.5, top_k=4, top_p=0.9, min_p=0.1),
    ],
)
def test_draws_follow_the_kept_distribution(params: SamplingParams) -> None:
    n = 20000  # one row per draw, each with its own generator: one batched call
    rows = LOGITS.repeat(n, 1)
    tokens = sample_rows(rows, [params] * n, [torch.Generator().manual_seed(i) for i in range(n)])
    freq = torch.bincount(torch.tensor(tokens), minlength=LOGITS.shape[0]).float() / n
    expected = _kept_distribution(LOGITS, params)
    assert torch.equal(freq > 0, expected > 0)  # never a token the cuts removed
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_a_seed_draws_the_same_token_whatever_the_batch() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(12, 300, generator=gen) * 2
    params = [
        SamplingParams(temperature=0.5 + 0.1 * i, top_k=i % 4 * 7, top_p=1.0 - 0.05 * (i % 3))
        for i in range(12)
    ]
    together = sample_rows(logits, params, [torch.Generator().manual_seed(i) for i in range(12)])
    alone = [
        sample_rows(logits[i : i + 1], [params[i]], [torch.Generator().manual_seed(i)])[0]
        for i in range(12)
    ]
    assert together == alone


def test_a_nucleus_past_the_candidates_is_found_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", 8)  # 8, then 128, then the whole row
    logits = torch.cat([-0.002 * torch.arange(1000.0), torch.full((3000,), -40.0)])
    params = SamplingParams(temperature=1.0, top_p=0.99)
    n = 6000
    tokens = sample_rows(
        logits.repeat(n, 1), [params] * n, [torch.Generator().manual_seed(i) for i in range(n)]
    )
    expected = _kept_distribution(logits, params)
    assert max(tokens) > 128  # found past the second round of candidates
    assert all(expected[t] > 0 for t in tokens)
    assert max(tokens) < 1000  # the negligible tail is outside the nucleus


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
        # Not integers: top_k=3.0 failed inside a step, with every request of its batch.
        {"top_k": 3.0},
        {"seed": 1.5},
        {"logprobs": 2.0},
        {"prompt_logprobs": True},
        # Not strings or not a bool: they failed inside a step and ended the engine's thread.
        {"stop": ("a", 1)},
        {"stop": b"ab"},
        {"skip_special_tokens": "no"},
    ],
)
def test_invalid_params_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidSamplingParams):
        SamplingParams(**kwargs)


def test_find_stop() -> None:
    assert find_stop("hello world", ("wor",), 0) == 6
    assert find_stop("hello world", ("xyz", "lo"), 0) == 3
    assert find_stop("hello world", ("lo",), 6) == -1
    # Of several stops the earliest match wins, whatever the order they are given in (vLLM cuts
    # the text at the first stop string it finds).
    text = "abc END1 def END2 ghi"
    assert find_stop(text, ("END2", "END1"), 0) == find_stop(text, ("END1", "END2"), 0) == 4
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
    # A long output, each token decoded in a window of a few: the text is the whole decode's,
    # and no call decodes more than twice the context (it decoded the whole output each time).
    long = tokenizer.encode(" The answer is yes, it is Paris." * 200, add_special_tokens=False).ids
    sizes: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            sizes.append(len(ids))
            return str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    detok = IncrementalDetokenizer(Counting(), prompt)
    streamed = "".join(detok.add(t) for t in long)
    assert streamed == tokenizer.decode(prompt + long)[len(tokenizer.decode(prompt)) :]
    assert max(sizes) <= 2 * CONTEXT_TOKENS


def _byte_fallback_tokenizer() -> tuple[Any, dict[str, int]]:
    """A Llama-2/Mistral-style tokenizer: Metaspace pieces, and <0xNN> tokens for other characters."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "▁The", "▁answer", "▁is", "▁Hello"]:
        vocab[piece] = len(vocab)
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in ("<unk>", "<s>", "</s>")])
    return tokenizer, vocab


def _byte_tokens(text: str) -> list[int]:
    return [3 + b for b in text.encode()]


@pytest.mark.parametrize("characters", ["🙂😀🚀", "兔龜鼠虎"])
def test_byte_fallback_characters_in_a_row_are_not_replaced(characters: str) -> None:
    # From the third such character on, each came out as U+FFFD: the window started 5 tokens
    # back, inside a character, and a byte-fallback decoder turns that whole run into U+FFFD.
    from mintvcs.serve.sampling import IncrementalDetokenizer

    tokenizer, vocab = _byte_fallback_tokenizer()
    words = [vocab["▁The"], vocab["▁answer"], vocab["▁is"]]
    # The second prompt ends in 6 byte tokens: its last 5 start inside a character.
    for prompt in (words, words + _byte_tokens("兔龜")):
        output = [*_byte_tokens(characters), vocab["▁answer"]]
        expected = tokenizer.decode(prompt + output)[len(tokenizer.decode(prompt)) :]
        assert expected == f"{characters} answer"
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detok.add(t) for t in output]
        assert "".join(deltas) == expected
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("style", ["byte-level", "byte-fallback"])
@pytest.mark.parametrize("cut", [1, 2])
def test_a_prompt_that_ends_inside_a_character_leaves_it_to_the_output(
    style: str, cut: int
) -> None:
    # A prompt of ids cut mid-character (a client continuing an output max_tokens cut there):
    # its half was counted as text already shown, so the token completing it added "".
    from tokenizers.decoders import DecodeStream

    from mintvcs.serve.sampling import IncrementalDetokenizer

    if style == "byte-level":
        tokenizer, _ = _byte_level_tokenizer()
        ids = [_HELLO, 3 + ord(" "), *_byte_tokens("中")]
    else:
        tokenizer, vocab = _byte_fallback_tokenizer()
        ids = [vocab["▁Hello"], *_byte_tokens("中")]
    prompt, output = ids[:-cut], [*ids[-cut:], *_byte_tokens("!")]
    assert tokenizer.decode(prompt).endswith("\ufffd")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in output]
    assert deltas == [""] * (cut - 1) + ["中", "!"]
    # What tokenizers' DecodeStream (vLLM's) gives for the output after stepping the prompt.
    stream = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream.step(tokenizer, t)
    assert [stream.step(tokenizer, t) or "" for t in output] == deltas


@pytest.mark.parametrize(
    ("before", "character", "cut"),
    [("éé中", "é", 1), ("😀aé ", "😀", 3), ("a兔兔", "龜", 1)],
)
def test_a_byte_fallback_prompt_cut_inside_a_character_after_others_leaves_it_to_the_output(
    before: str, character: str, cut: int
) -> None:
    # The prompt's last 5 tokens started inside an earlier character: its window was to start
    # where a decode does not begin with U+FFFD, but the open tail turns the whole <0xNN> run
    # into U+FFFD, so the window began on a continuation byte and the character came out as
    # U+FFFD (DecodeStream gives it).
    from tokenizers.decoders import DecodeStream

    from mintvcs.serve.sampling import IncrementalDetokenizer

    tokenizer, vocab = _byte_fallback_tokenizer()
    rest = _byte_tokens(character)
    prompt = [vocab["▁Hello"], *_byte_tokens(before), *rest[:cut]]
    output = [*rest[cut:], vocab["▁is"]]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in output]
    assert deltas == [""] * (len(output) - 2) + [character, " is"]
    assert detok.flush() == f"{character} is"
    stream = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream.step(tokenizer, t)
    assert [stream.step(tokenizer, t) or "" for t in output] == deltas


@pytest.mark.parametrize("head", [[], ["▁"]])
def test_a_prompt_with_no_text_before_its_unfinished_character_leaves_it_to_the_output(
    head: list[str],
) -> None:
    # The prompt's text before its unfinished character was "" (nothing, or a lone "▁" that the
    # decoder strips), which counted as no text at all: the completed character came out as one
    # U+FFFD per byte token.
    from tokenizers.decoders import DecodeStream

    from mintvcs.serve.sampling import IncrementalDetokenizer

    tokenizer, vocab = _byte_fallback_tokenizer()
    han = _byte_tokens("中")
    prompt = [*(vocab[piece] for piece in head), han[0]]
    output = [*han[1:], vocab["▁is"]]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in output]
    assert deltas == ["", "中", " is"]
    stream = DecodeStream(skip_special_tokens=True)
    for t in prompt:
        stream.step(tokenizer, t)
    assert [stream.step(tokenizer, t) or "" for t in output] == deltas


def test_a_prompt_s_unfinished_character_is_the_output_s_only_once_completed() -> None:
    from mintvcs.serve.sampling import IncrementalDetokenizer

    tokenizer, _ = _byte_level_tokenizer()
    world = _byte_tokens("界")
    for prompt, output, expected in [
        # A piece holding " 世" and the start of "界": the output gets "界", not " 世" again.
        ([_HELLO, _WORLD_CUT], world[2:] + _byte_tokens("!"), ["界", "!"]),
        # Not completed: the prompt's U+FFFD stays out of the output (a grammar's "{" is "{").
        ([_HELLO, world[0]], _byte_tokens("{"), ["{"]),
        # A stray byte is no character's start: text as it decodes, left to the prompt.
        ([_HELLO, 3 + 0x80], _byte_tokens("ok"), ["o", "k"]),
        # The token holding the start of "界" begins inside "😀": its "!" is the prompt's text
        # too, not "😀" decoded from its last two bytes alone (two U+FFFD, then "!").
        ([_HELLO, *_byte_tokens("😀")[:2], _SMILE_CUT], world[2:] + _byte_tokens("?"), ["界", "?"]),
    ]:
        detok = IncrementalDetokenizer(tokenizer, prompt)
        assert [detok.add(t) for t in output] == expected, prompt
        assert detok.flush() == "".join(expected)
    # What echo shows of such a prompt: its text up to the unfinished character.
    from mintvcs.serve.http_api import TokenTexts

    prompt = [_HELLO, *_byte_tokens("😀")[:2], _SMILE_CUT]
    assert TokenTexts(tokenizer).decode_whole_characters(prompt) == "Hello😀!"


def test_byte_pieces_a_decoder_shows_as_written_are_text_not_bytes() -> None:
    # A bare Metaspace decoder has no ByteFallback step: "<0xE4>" decodes as those six
    # characters. The pieces were read as the bytes of an unfinished "中" all the same, so a
    # prompt of ids ending in them lost their text: echo left it to the completion, which
    # never showed it ("Hello <0xAD> yes" for "Hello <0xE4><0xB8><0xAD> yes").
    from tokenizers import decoders

    from mintvcs.serve.http_api import TokenTexts
    from mintvcs.serve.sampling import IncrementalDetokenizer, incomplete_tail

    tokenizer, vocab = _byte_fallback_tokenizer()
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    han = _byte_tokens("中")
    prompt = [vocab["▁Hello"], vocab["▁"], *han[:2]]
    output = [han[2], vocab["▁is"]]
    assert tokenizer.decode(prompt + output) == "Hello <0xE4><0xB8><0xAD> is"
    assert incomplete_tail(tokenizer, prompt) == (0, "")
    echo = TokenTexts(tokenizer).decode_whole_characters(prompt)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    streamed = "".join(detok.add(t) for t in output)
    assert echo + streamed == tokenizer.decode(prompt + output)


def _sequence(tokenizer: Any, prompt: list[int], params: SamplingParams) -> Any:
    from mintvcs.serve.sampling import IncrementalDetokenizer
    from mintvcs.serve.scheduler import Sequence

    return Sequence(
        request_id=0,
        prompt_ids=prompt,
        params=params,
        revision=None,
        sink=lambda event: None,
        detok=IncrementalDetokenizer(tokenizer, prompt),
        eos_ids=frozenset({2}),
        max_len=10**6,
    )


def _byte_level_tokenizer() -> tuple[Any, dict[str, int]]:
    """A GPT-2-style byte-level vocabulary with one token ending inside a character (' 世' + 2 bytes of 界)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    # GPT-2's byte-to-character map: printable bytes stand for themselves, the rest from U+0100.
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({char[b]: 3 + b for b in range(256)})
    for text in [b"Hello", " 世界".encode()[:6], _SMILE_CUT_BYTES]:
        vocab["".join(char[b] for b in text)] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in ("<unk>", "<s>", "</s>")])
    return tokenizer, vocab


# "Hello", then one token: " 世" and the first two bytes of "界" (a character left unfinished).
_HELLO, _WORLD_CUT = 259, 260
# A token that begins inside a character and ends inside another: the last 2 bytes of "😀",
# "!" and the first 2 bytes of "界".
_SMILE_CUT_BYTES = "😀".encode()[2:] + b"!" + "界".encode()[:2]
_SMILE_CUT = 261


@pytest.mark.parametrize("stop", [" 世", "世"])
def test_a_stop_string_in_the_text_flushed_at_max_tokens_is_cut(stop: str) -> None:
    # The last token completed the stop string and began a character: the text flushed at
    # max_tokens was not searched, and came back with the stop string and finish_reason length.
    tokenizer, _ = _byte_level_tokenizer()
    seq = _sequence(tokenizer, [_HELLO], SamplingParams(max_tokens=2, stop=(stop,)))
    events = [seq.append(t) for t in (_HELLO, _WORLD_CUT)]
    assert "".join(e.text for e in events) == "Hello" + " 世"[: " 世".index(stop)]
    assert events[-1].finish_reason == "stop"


def test_a_stop_string_that_begins_inside_min_tokens_is_cut_from_where_it_begins() -> None:
    # Within min_tokens nothing was held back: "abc" ending past the first 4 tokens counted (vLLM's
    # rule), but the "ab" already sent stayed, and the text came back as "xxab".
    tokenizer, _ = _byte_level_tokenizer()
    seq = _sequence(tokenizer, [_HELLO], SamplingParams(max_tokens=10, min_tokens=4, stop=("abc",)))
    events = [seq.append(3 + b) for b in b"xxabc"]
    assert [e.text for e in events] == ["x", "x", "", "", ""]
    assert events[-1].finish_reason == "stop"
    # A stop string that ends inside the first min_tokens tokens' text still does not count,
    # and what can no longer become one is sent at once: "ab" when "d" follows.
    seq = _sequence(
        tokenizer, [_HELLO], SamplingParams(max_tokens=7, min_tokens=3, stop=("abc", "abd"))
    )
    events = [seq.append(3 + b) for b in b"abcabxy"]
    assert [e.text for e in events] == ["", "", "abc", "", "", "abx", "y"]
    assert events[-1].finish_reason == "length"
    seq = _sequence(tokenizer, [_HELLO], SamplingParams(max_tokens=7, stop=("xyz",)))
    assert [seq.append(3 + b).text for b in b"axyaxbc"] == ["a", "", "", "xya", "", "xb", "c"]


def test_a_character_left_unfinished_is_kept_whatever_ends_the_output() -> None:
    # At EOS the pending tail was dropped, the space before it too; at max_tokens it was kept.
    tokenizer, _ = _byte_level_tokenizer()
    expected = tokenizer.decode([_HELLO, _WORLD_CUT])
    assert expected == "Hello 世\ufffd"
    for ids, params, reason in [
        ([_HELLO, _WORLD_CUT, 2], SamplingParams(max_tokens=10), "stop"),
        ([_HELLO, _WORLD_CUT], SamplingParams(max_tokens=2), "length"),
    ]:
        seq = _sequence(tokenizer, [_HELLO], params)
        events = [seq.append(t) for t in ids]
        assert "".join(e.text for e in events) == expected
        assert events[-1].finish_reason == reason


def test_a_broken_byte_after_a_byte_fallback_character_is_one_replacement_character() -> None:
    # tokenizer.decode turns the whole <0xNN> run into U+FFFD once a byte in it is invalid, "中"
    # included; "中" had been sent, and the text took decode's tail past it: "中���" at
    # max_tokens for the one byte of a character left unfinished, "中����" for two stray bytes.
    tokenizer, vocab = _byte_fallback_tokenizer()
    han = _byte_tokens("中")
    assert tokenizer.decode([*han, 3 + 0xE5]) == "\ufffd" * 4  # why the text cannot be decode's
    for output, expected in [
        ([*han, 3 + 0xE5], "中\ufffd"),
        ([*han, 3 + 0x80, 3 + 0x80, vocab["▁The"]], "中\ufffd\ufffd The"),
    ]:
        params = SamplingParams(max_tokens=len(output))
        seq = _sequence(tokenizer, [vocab["▁Hello"]], params)
        events = [seq.append(t) for t in output]
        assert "".join(e.text for e in events) == expected
        assert events[-1].finish_reason == "length"


def test_a_run_of_skipped_special_tokens_keeps_the_decodes_short() -> None:
    # EOS after EOS (ignore_eos) added no text, so the window never moved and every decode
    # grew by one token: 4,000 of them cost ~1 s on the step thread.
    from mintvcs.serve.sampling import IncrementalDetokenizer

    tokenizer, vocab = _byte_fallback_tokenizer()
    sizes: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            sizes.append(len(ids))
            return str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    output = [vocab["▁answer"], *[2] * 500, vocab["▁is"]]
    for skip in (True, False):
        sizes.clear()
        detok = IncrementalDetokenizer(Counting(), [vocab["▁The"]], skip_special_tokens=skip)
        text = "".join(detok.add(t) for t in output)
        prompt_text = tokenizer.decode([vocab["▁The"]], skip_special_tokens=skip)
        whole = tokenizer.decode([vocab["▁The"], *output], skip_special_tokens=skip)
        assert text == whole[len(prompt_text) :]
        assert max(sizes) <= 3


def _exact_inverse_cdf(weights: torch.Tensor, u: float) -> int:
    """The token whose share of the exact (rational) cumulative weight holds the draw u."""
    parts = [Fraction(w) for w in weights.tolist()]
    target = Fraction(u) * sum(parts)
    running = Fraction(0)
    for token, part in enumerate(parts):
        running += part
        if running > target:
            return token
    raise AssertionError("the draw fell past the total")


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_tokens_under_float32_resolution_are_drawn_by_their_exact_share(seed: int) -> None:
    # A token of mass about u, a block of 2**14 tokens of 6e-9 each (under half a float32 ulp
    # of the running sum), then the rest: the seed's draw u falls inside the block. A float32
    # cumulative sum gives most block tokens no width at all (they can never be drawn) and
    # hands their share to the next one that happens to round up.
    u = torch.rand((), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).item()
    assert 0.01 < u < 0.99  # the seed's draw, which the sampler takes (one per row)
    block, width = 1 << 14, 1e-4
    masses = [u - width / 2, *[width / block] * block, 1.0 - u - width / 2]
    logits = torch.tensor(masses, dtype=torch.float64).log().float()
    params = SamplingParams(temperature=1.0, seed=seed)
    token = sample_rows(logits.unsqueeze(0), [params], [params.generator()])[0]
    # The sampler's unnormalised weights at temperature 1 (the likeliest at exactly 1).
    weights = torch.exp(logits - logits.max())
    assert token == _exact_inverse_cdf(weights, u)
    assert 1 <= token <= block
