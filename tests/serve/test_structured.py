"""Structured outputs in the engine: PEFT's generate with the same grammar mask is the oracle."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llguidance
import pytest
import torch

from mintvcs.serve import Engine, EngineConfig, InvalidSamplingParams, SamplingParams
from mintvcs.serve.sampling import StructuredOutput
from mintvcs.serve.structured import (
    PARALLEL_MASK_ROWS,
    Grammars,
    InvalidStructuredOutput,
    blocked_tokens,
    token_bitmask,
    unpack_blocked,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PATTERN = r"[0-9]{3}-[a-z]{2,4}"
CHOICES = ["yes", "no", "maybe not"]
GRAMMAR = 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/'

SPECS = {
    "json": StructuredOutput.json_schema(PERSON, compact=True),
    "regex": StructuredOutput("regex", PATTERN),
    "choice": StructuredOutput.choice(CHOICES),
    "grammar": StructuredOutput("grammar", GRAMMAR),
}


def _matches(kind: str, text: str) -> bool:
    """Whether a complete output satisfies its spec, checked without llguidance."""
    if kind == "json":
        value = json.loads(text)
        return (
            set(value) == {"name", "age", "tags"}
            and isinstance(value["name"], str)
            and len(value["name"]) <= 6
            and isinstance(value["age"], int)
            and 0 <= value["age"] <= 150
            and all(t in ("a", "b") for t in value["tags"])
            and len(value["tags"]) <= 2
        )
    if kind == "regex":
        return re.fullmatch(PATTERN, text) is not None
    if kind == "choice":
        return text in CHOICES
    return re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", text) is not None


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _peft_masked_greedy(
    base: Path, adapter: Path | None, prompt: list[int], spec: StructuredOutput, max_new: int
) -> list[int]:
    """Greedy tokens of HF (with PEFT) whose every step is masked by an llguidance matcher of its own."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    vocab = model.config.vocab_size
    tokenizer = llguidance.LLTokenizer(
        (base / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=2
    )
    if spec.kind == "json":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            spec.spec,
            defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
        )
    elif spec.kind == "choice":
        grammar = llguidance.grammar_from("choice", spec.spec)
    else:
        grammar = llguidance.grammar_from("regex" if spec.kind == "regex" else "lark", spec.spec)
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    seen = len(prompt)

    def allowed(_batch: int, ids: torch.Tensor) -> list[int]:
        nonlocal seen
        for token in ids[seen:].tolist():
            assert matcher.consume_token(token)
        seen = len(ids)
        mask = llguidance.LLMatcher.compute_logit_bias(matcher)
        return [t for t in range(vocab) if mask[t]]

    with torch.no_grad():
        out = model.eval().generate(
            input_ids=torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=max_new,
            prefix_allowed_tokens_fn=allowed,
            eos_token_id=2,
            pad_token_id=0,
        )
    return list(out[0, len(prompt) :].tolist())


@pytest.mark.parametrize("kind", list(SPECS))
def test_greedy_equals_peft_masked_by_the_same_grammar(
    engine: Engine, tiny_base: Path, zoo: dict[str, Path], kind: str
) -> None:
    spec = SPECS[kind]
    for adapter, seed in ((None, 1), ("all-r16", 2), ("qv-r8", 3)):
        prompt = _prompt(seed, 9)
        ours = engine.generate(
            prompt,
            adapter,
            SamplingParams(max_tokens=48, temperature=0.0, structured=spec),
            timeout=60,
        )
        oracle = _peft_masked_greedy(
            tiny_base, None if adapter is None else zoo[adapter], prompt, spec, 48
        )
        # A grammar that takes no further token ends our output at once; HF runs one more
        # step, where EOS is the only token left.
        if ours.finish_reason == "stop" and oracle[-1:] == [2] and ours.token_ids[-1:] != [2]:
            oracle = oracle[:-1]
        assert ours.token_ids == oracle, (kind, adapter)
        if ours.finish_reason == "stop":
            assert _matches(kind, ours.text), (kind, adapter, ours.text)


@pytest.mark.parametrize("kind", list(SPECS))
def test_sampled_outputs_match_their_spec(engine: Engine, kind: str) -> None:
    spec = SPECS[kind]
    done = engine.generate_many(
        [
            (_prompt(seed, 7), ("all-r16", "mlp-r2", None)[seed % 3], params)
            for seed in range(6)
            for params in [
                SamplingParams(max_tokens=64, temperature=1.0, seed=seed, structured=spec)
            ]
        ],
        timeout=120,
    )
    for c in done:
        assert c.finish_reason == "stop", (kind, c.text)
        assert _matches(kind, c.text), (kind, c.text)
    # Seeded: the same request gives the same output.
    again = engine.generate(
        _prompt(0, 7),
        "all-r16",
        SamplingParams(max_tokens=64, temperature=1.0, seed=0, structured=spec),
        timeout=60,
    )
    assert again.token_ids == done[0].token_ids


def test_a_mixed_batch_gives_each_request_what_it_gives_alone(engine: Engine) -> None:
    requests = [
        (_prompt(40 + i, 5 + i), ("all-r16", "qv-r8", "kv-r12", None)[i % 4], params)
        for i, params in enumerate(
            [
                SamplingParams(max_tokens=24, temperature=0.0, structured=SPECS["json"]),
                SamplingParams(max_tokens=24, temperature=0.0),
                SamplingParams(max_tokens=24, temperature=0.7, seed=5, structured=SPECS["regex"]),
                SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=24, temperature=0.0, structured=SPECS["choice"]),
                SamplingParams(max_tokens=24, temperature=0.9, seed=6, structured=SPECS["grammar"]),
                SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.3),
                SamplingParams(
                    max_tokens=24, temperature=0.0, repetition_penalty=1.3, structured=SPECS["json"]
                ),
            ]
        )
    ]
    together = engine.generate_many(requests, timeout=120)
    for request, got in zip(requests, together, strict=True):
        alone = engine.generate(*request, timeout=60)
        assert got.token_ids == alone.token_ids
        assert got.finish_reason == alone.finish_reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_masks_come_from_the_thread_pool_and_unpack_there(
    tiny_base: Path, zoo: dict[str, Path]
) -> None:
    from mintvcs.serve import PeftDirSource

    words = torch.randint(-(2**31), 2**31, (6, 13), dtype=torch.int32)
    cuda = torch.device("cuda")
    on_gpu = blocked_tokens(words, 400, cuda)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), blocked_tokens(words, 400, torch.device("cpu")))
    # A batch of PARALLEL_MASK_ROWS or more constrained rows takes llguidance's thread pool.
    config = EngineConfig(
        device="cuda", dtype="float32", max_batch_size=8, adapter_slots=4, max_model_len=128
    )
    with Engine(tiny_base, config, source=PeftDirSource(zoo)) as gpu:
        kinds = [*SPECS, *SPECS]
        requests = [
            (
                _prompt(60 + i, 6),
                ("all-r16", "qv-r8", None)[i % 3],
                SamplingParams(max_tokens=48, temperature=0.8, seed=i, structured=SPECS[kind]),
            )
            for i, kind in enumerate(kinds)
        ]
        together = gpu.generate_many(requests, timeout=120)
        # Graphs are on by default, and a capture that fails only logs a warning and decodes
        # eagerly: without this the masks would pass unchecked against graph-replayed steps.
        graphs = gpu.scheduler.graphs
        assert graphs is not None and graphs.failure is None, graphs and graphs.failure
        assert graphs.captured >= 1 and graphs.steps >= 1
        # (Not compared with each request alone: on a GPU a batch's matmuls may round
        # differently from a single row's, and a sampled token can then differ.)
        assert sum(got.finish_reason == "stop" for got in together) >= len(kinds) // 2
        for kind, got in zip(kinds, together, strict=True):
            if got.finish_reason == "stop":
                assert _matches(kind, got.text), (kind, got.text)


def test_max_tokens_cuts_a_structured_output_short(engine: Engine) -> None:
    out = engine.generate(
        _prompt(7, 6),
        None,
        SamplingParams(max_tokens=3, temperature=0.0, structured=SPECS["json"]),
        timeout=60,
    )
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 3
    assert out.text.startswith('{"')


def test_min_tokens_cannot_outlast_a_complete_grammar(engine: Engine) -> None:
    out = engine.generate(
        _prompt(8, 6),
        None,
        SamplingParams(
            max_tokens=20,
            temperature=0.0,
            min_tokens=15,
            structured=StructuredOutput.choice(["ok"]),
        ),
        timeout=60,
    )
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_min_tokens_gives_way_to_a_grammar_that_allows_only_stop_tokens(
    engine: Engine, tiny_base: Path
) -> None:
    # Every token that spells "a" is a stop token, which min_tokens bars: the grammar wins, as
    # it does over EOS, and the output ends on one; no failed request for lack of a token.
    tokenizer = llguidance.LLTokenizer((tiny_base / "tokenizer.json").read_text(), eos_token=2)
    matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("regex", "a"))
    bias = matcher.compute_logit_bias()[: tokenizer.vocab_size]
    spelling = [t for t, b in enumerate(bias) if b != 0]
    assert 0 < len(spelling) < 8
    out = engine.generate(
        _prompt(9, 6),
        None,
        SamplingParams(
            max_tokens=20,
            temperature=0.0,
            min_tokens=15,
            stop_token_ids=tuple(spelling),
            structured=StructuredOutput.choice(["a"]),
        ),
        timeout=60,
    )
    assert out.finish_reason == "stop" and out.token_ids[-1] in spelling
    assert len(out.token_ids) == 1


def test_allowed_token_ids_hold_under_a_structured_output_or_the_request_fails(
    engine: Engine, tiny_base: Path
) -> None:
    from tokenizers import Tokenizer

    from mintvcs.serve.structured import StructuredOutputError

    tokenizer = Tokenizer.from_file(str(tiny_base / "tokenizer.json"))
    digits = [tokenizer.token_to_id(c) for c in "0123456789"]
    letters = [tokenizer.token_to_id(c) for c in "xyz"]
    assert None not in digits and None not in letters

    def run(allowed: list[int], pattern: str, **extra: Any) -> Any:
        params = SamplingParams(
            max_tokens=8,
            temperature=1.0,
            seed=0,
            allowed_token_ids=tuple(allowed),
            structured=StructuredOutput("regex", pattern),
            **extra,
        )
        return engine.generate_many([(_prompt(10, 6), None, params)], timeout=60)[0]

    # Both hold where they allow tokens in common: only the allowed digits come out.
    two = digits[3:5]
    out = run(two, "[0-9]{3}")
    assert len(out.token_ids) == 3 and set(out.token_ids) <= set(two), out
    # min_tokens bars the stop token where the grammar allows it or a letter: min_tokens gives
    # way, allowed_token_ids does not (no letter).
    out = run([*two, 2], "[0-9]{3}[a-z]?", min_tokens=5, stop_token_ids=(2,))
    assert len(out.token_ids) == 4 and set(out.token_ids) <= {*two, 2}, out
    # Where they allow none in common (at once, or after a first token), the request fails
    # with that reason: no token outside allowed_token_ids, none the grammar refuses.
    with pytest.raises(StructuredOutputError, match=r"allowed_token_ids and the regex .* 0 tokens"):
        run(letters, "[0-9]{3}")
    with pytest.raises(StructuredOutputError, match=r"allowed_token_ids and the regex .* 1 tokens"):
        run(letters, "x[0-9]{2}")
    assert engine.generate([5, 6, 7], None, SamplingParams(max_tokens=2), timeout=30).token_ids


def test_a_regex_allowing_more_may_end_on_eos(engine: Engine) -> None:
    # [a-z]+ accepts after one letter: from then on EOS is allowed, and the output may end on it.
    spec = StructuredOutput("regex", "[a-z]+")
    outs = engine.generate_many(
        [
            (
                _prompt(s, 5),
                None,
                SamplingParams(max_tokens=40, temperature=1.0, seed=s, structured=spec),
            )
            for s in range(8)
        ],
        timeout=120,
    )
    for out in outs:
        assert re.fullmatch("[a-z]*", out.text), out.text
        if out.finish_reason == "stop":
            assert out.token_ids[-1] == 2 and out.text
    assert any(o.finish_reason == "stop" for o in outs)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (lambda: StructuredOutput("regex", "([a-z"), "regex"),
        (lambda: StructuredOutput("json", "{not json"), "json"),
        (lambda: StructuredOutput.json_schema({"type": "nonsense"}), "nonsense"),
        (lambda: StructuredOutput("grammar", "start: undefined_rule"), "grammar"),
    ],
)
def test_a_spec_that_does_not_compile_is_refused(engine: Engine, spec: Any, message: str) -> None:
    with pytest.raises(InvalidStructuredOutput, match=message):
        engine.generate(
            [5, 6, 7], None, SamplingParams(max_tokens=4, structured=spec()), timeout=30
        )
    # The engine goes on serving.
    assert engine.generate([5, 6, 7], None, SamplingParams(max_tokens=2), timeout=30).token_ids


@pytest.mark.parametrize(
    "make",
    [
        lambda: StructuredOutput("yaml", "a: 1"),
        lambda: StructuredOutput("regex", ""),
        lambda: StructuredOutput.choice([]),
        lambda: StructuredOutput.choice(["a", ""]),
        lambda: StructuredOutput.choice("ab"),  # type: ignore[arg-type]
    ],
)
def test_malformed_specs_are_refused_before_compiling(make: Any) -> None:
    with pytest.raises(InvalidSamplingParams):
        make()


def test_engine_without_tokenizer_refuses_structured_outputs(tiny_base: Path) -> None:
    from mintvcs.serve import InvalidRequest, Model

    model = Model.from_dir(tiny_base, dtype=torch.float32, device=torch.device("cpu"), max_len=64)
    with (
        Engine(model, EngineConfig(max_batch_size=2)) as eng,
        pytest.raises(InvalidRequest, match="tokenizer"),
    ):
        eng.generate([5, 6], None, SamplingParams(structured=SPECS["regex"]), timeout=30)


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int) -> torch.Tensor:
    """bool [len(matchers), vocab_size]: the tokens each matcher accepts next, as a CPU step sees it."""
    bits = token_bitmask(matchers, vocab_size)
    return blocked_tokens(bits, vocab_size, torch.device("cpu")).logical_not_()


def test_the_bitmask_unpacks_to_what_llguidance_allows(tiny_base: Path) -> None:
    tokenizer = llguidance.LLTokenizer((tiny_base / "tokenizer.json").read_text(), eos_token=2)
    matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("regex", "[0-9]+"))
    vocab = tokenizer.vocab_size
    got = allowed_tokens([matcher, matcher.deep_copy()], vocab)
    expected = torch.tensor([b != 0 for b in matcher.compute_logit_bias()[:vocab]])
    assert got.shape == (2, vocab)
    assert torch.equal(got[0], expected) and torch.equal(got[1], expected)
    assert 0 < int(expected.sum()) < vocab


def test_masks_on_the_thread_pool_and_unpacked_by_torch_agree(tiny_base: Path) -> None:
    # What a GPU's steps run: masks on llguidance's threads, unpacked on the device.
    grammars = Grammars((tiny_base / "tokenizer.json").read_text(), [2], 400)
    matchers = []
    for i, spec in enumerate([*SPECS.values(), *SPECS.values()]):
        matcher = grammars.matcher(spec)
        for token in [t for t in range(400) if allowed_tokens([matcher], 400)[0, t]][i : i + 1]:
            assert matcher.consume_token(token)  # rows in different states
        matchers.append(matcher)
    serial = token_bitmask(matchers, 400)
    assert len(matchers) >= PARALLEL_MASK_ROWS
    assert torch.equal(token_bitmask(matchers, 400, parallel=True), serial)
    cpu = torch.device("cpu")
    assert torch.equal(unpack_blocked(serial, 400), blocked_tokens(serial, 400, cpu))
    words = torch.randint(-(2**31), 2**31, (5, 13), dtype=torch.int32)  # bit 31 set in half
    expected = [[not (int(w) >> j) & 1 for w in row for j in range(32)][:400] for row in words]
    assert unpack_blocked(words, 400).tolist() == expected
    assert blocked_tokens(words, 400, cpu).tolist() == expected


def test_a_padded_vocabulary_never_allows_its_padding(tiny_base: Path) -> None:
    text = (tiny_base / "tokenizer.json").read_text()
    grammars = Grammars(text, [2], 400)  # 384 tokens, 16 rows of padding (as Qwen2 pads)
    matcher = grammars.matcher(StructuredOutput("regex", "[a-z ]+"))
    allowed = allowed_tokens([matcher], 400)[0]
    assert allowed[:384].any() and not allowed[384:].any()
    with pytest.raises(InvalidStructuredOutput, match="does not fit its 300-token vocabulary"):
        Grammars(text, [2], 300)


def test_choices_are_matched_literally_and_scale(engine: Engine) -> None:
    odd = ["a.b", "(x|y)*", "tab\there", 'quote"s', "back\\slash", "naïve 😀", "[1-9]+"]
    outs = engine.generate_many(
        [
            (
                _prompt(s, 5),
                None,
                SamplingParams(
                    max_tokens=30, temperature=1.0, seed=s, structured=StructuredOutput.choice(odd)
                ),
            )
            for s in range(10)
        ],
        timeout=120,
    )
    assert all(o.text in odd and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    many = [f"option {i:04d}" for i in range(3000)]  # past llguidance's 2000 grammar branches
    out = engine.generate(
        _prompt(3, 5),
        None,
        SamplingParams(
            max_tokens=30, temperature=1.0, seed=1, structured=StructuredOutput.choice(many)
        ),
        timeout=60,
    )
    assert out.text in many and out.finish_reason == "stop"


def test_a_spec_compiling_in_one_thread_is_shared_with_the_others(engine: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    grammars = engine.grammars()
    spec = StructuredOutput.json_schema(
        {"type": "object", "properties": {"k": {"type": "integer"}}}
    )
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: grammars.compile(spec), range(8)))
    assert all(g is got[0] for g in got)


def test_submitting_with_compiled_matchers_compiles_nothing(engine: Engine) -> None:
    import asyncio

    grammars = engine.grammars()
    spec = StructuredOutput("regex", "z{2,5}")
    template = grammars.compile(spec)
    for i in range(70):  # more than the cache keeps: spec is dropped
        grammars.compile(StructuredOutput("regex", f"q{{{i + 1}}}"))
    assert spec not in grammars._compiled

    async def run() -> str:
        (stream,) = engine.submit_many(
            [([5, 6, 7], None, SamplingParams(max_tokens=8, structured=spec))],
            compiled={spec: template},
        )
        text = ""
        async with stream:
            async for event in stream:
                text += event.text
        return text

    assert re.fullmatch("z{2,5}", asyncio.run(run()))
    assert spec not in grammars._compiled


def test_a_grammar_worn_out_by_use_is_compiled_afresh_for_running_requests_too(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mintvcs.serve import structured
    from mintvcs.serve.structured import StructuredOutputError

    # The copies of one compiled grammar share its lexer's states, which [ab]*a[ab]{n} keeps
    # adding to: with a small cap, a batch of requests meets it after a few dozen of them. The
    # requests running then must go on (on the grammar compiled afresh, their output so far
    # replayed), and give what they give with llguidance's own cap, where it is never met.
    spec = StructuredOutput("regex", "[ab]*a[ab]{10}")
    builds = 0
    build = structured.Grammars._build

    def counted(self: structured.Grammars, spec: StructuredOutput) -> Any:
        nonlocal builds
        builds += 1
        return build(self, spec)

    monkeypatch.setattr(structured.Grammars, "_build", counted)

    def outputs(failures: bool = False) -> list[Any]:
        """Each request's tokens (or, with `failures`, its StructuredOutputError's message)."""
        engine.grammars()._compiled.clear()
        out: list[Any] = []
        for batch in range(9):
            requests = [
                (
                    _prompt(batch, 4),
                    None,
                    SamplingParams(
                        max_tokens=24,
                        temperature=3.0,
                        seed=16 * batch + i,
                        logit_bias=((2, -100.0),),
                        structured=spec,
                    ),
                )
                for i in range(16)
            ]
            for future in engine.start_many(requests):
                try:
                    out.append(future.result(60).token_ids)
                except StructuredOutputError as err:
                    if not failures:
                        raise
                    out.append(str(err))
        return out

    unworn = outputs()
    assert builds == 1
    monkeypatch.setattr(
        structured,
        "_LIMITS",
        llguidance.LLParserLimits(verbose_errors=False, max_lexer_states=1000),
    )
    assert outputs() == unworn
    assert builds > 2, "the lexer's cap was never met"
    # A cap so small that fresh compiles fill within a step: a request may then fail (with the
    # cap's own error), but none is cut short by the EOS that a failed mask leaves.
    monkeypatch.setattr(
        structured,
        "_LIMITS",
        llguidance.LLParserLimits(verbose_errors=False, max_lexer_states=300),
    )
    outcomes = outputs(failures=True)
    assert any(isinstance(o, str) for o in outcomes), "no request met the cap"
    for got, want in zip(outcomes, unworn, strict=True):
        assert got == want or "too many states" in str(got), (got, want)


def test_an_eos_ending_a_grammar_leaves_no_text_with_special_tokens_kept(engine: Engine) -> None:
    spec = StructuredOutput("regex", "[0-9]+")
    outs = engine.generate_many(
        [
            (
                _prompt(s, 5),
                None,
                SamplingParams(
                    max_tokens=40,
                    temperature=1.0,
                    seed=s,
                    structured=spec,
                    skip_special_tokens=False,
                ),
            )
            for s in range(8)
        ],
        timeout=120,
    )
    ended = [o for o in outs if o.token_ids[-1:] == [2]]
    assert ended, "no output ended on EOS"
    for out in ended:
        # As without a grammar: the EOS that ends the output is not part of its text.
        assert out.finish_reason == "stop" and re.fullmatch("[0-9]+", out.text), out.text


def test_llguidance_errors_are_short_and_say_what_is_wrong(tiny_base: Path) -> None:
    from mintvcs.serve.structured import matcher_error

    class Panicked:  # what a schema of 16,000 properties got, after ~10 s of compiling
        def get_error(self) -> str:
            return (
                "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10\n"
                "<backtrace>\n" + "".join(f"  {i}: <unknown>\n" for i in range(48))
            )

    assert matcher_error(Panicked()) == (  # type: ignore[arg-type]
        "panic: assertion failed: grammar.symbols.len() < u16::MAX as usize - 10"
    )

    class Verbose:
        def get_error(self) -> str:
            return "parser error: " + "x" * 5000

    assert len(matcher_error(Verbose())) == 300  # type: ignore[arg-type]
    grammars = Grammars((tiny_base / "tokenizer.json").read_text(), [2], 384)
    for schema in (
        {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
        {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    ):
        with pytest.raises(InvalidStructuredOutput, match=r"\$ref that refers back to itself"):
            grammars.compile(StructuredOutput.json_schema(schema))


def test_an_error_just_past_the_limit_is_cut_to_it() -> None:
    """short_error cuts anything past ERROR_CHARS, however little past it is."""
    from mintvcs.serve.structured import ERROR_CHARS, short_error

    assert short_error("x" * ERROR_CHARS) == "x" * ERROR_CHARS
    cut = short_error("x" * (ERROR_CHARS + 50))
    assert len(cut) == ERROR_CHARS and cut.endswith("...")


def test_the_compile_cache_keeps_its_number_of_grammars(tiny_base: Path) -> None:
    """COMPILED_GRAMMARS compiled grammars are kept; one more pushes out the oldest."""
    from mintvcs.serve.structured import COMPILED_GRAMMARS

    grammars = Grammars((tiny_base / "tokenizer.json").read_text(), [2], 384)
    specs = [StructuredOutput("regex", f"a{{{i}}}") for i in range(1, COMPILED_GRAMMARS + 2)]
    for spec in specs:
        grammars.compile(spec)
    assert grammars.cached(specs[0]) is None
    assert all(grammars.cached(spec) is not None for spec in specs[1:])


def test_remembered_failures_are_bounded_in_characters(
    tiny_base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed specs are remembered within COMPILED_SPEC_CHARS, not only by their number."""
    from mintvcs.serve import structured

    monkeypatch.setattr(structured, "COMPILED_SPEC_CHARS", 1000)
    grammars = Grammars((tiny_base / "tokenizer.json").read_text(), [2], 384)
    for i in range(3):  # 600 characters each: two would pass the bound
        with pytest.raises(InvalidStructuredOutput):
            grammars.compile(StructuredOutput("regex", "(" * 600 + str(i)))
    assert len(grammars._failed) == 1


def _sentencepiece_tokenizer(decoder: str) -> Any:
    """A SentencePiece-style BPE tokenizer (Metaspace pieces, 256 <0xNN> byte-fallback tokens,
    <unk> <s> </s> at 0-2) whose decoder is a bare Metaspace (which shows <0xNN> as it is),
    ByteFallback then Metaspace, or Llama-2's Replace/ByteFallback/Fuse/Strip."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from mintvcs.serve.tiny import _TOKENIZER_CORPUS

    specials = ["<unk>", "<s>", "</s>"]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace()
    corpus = _TOKENIZER_CORPUS + ' {"name": "Ada", "age": 36, "tags": ["a", "b"]}' * 4
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    learner.train_from_iterator([corpus], trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = {piece: i for i, piece in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = {
        "metaspace": decoders.Metaspace(prepend_scheme="first"),
        "bytefallback-metaspace": decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(prepend_scheme="first")]
        ),
        "llama2": decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                decoders.Strip(content=" ", left=1, right=0),
            ]
        ),
    }[decoder]
    tokenizer.add_special_tokens([AddedToken(s, special=True) for s in specials])
    assert tokenizer.get_vocab_size() <= 384
    return tokenizer


SENTENCEPIECE_DECODERS = ["metaspace", "bytefallback-metaspace", "llama2"]


@pytest.mark.parametrize("decoder", SENTENCEPIECE_DECODERS)
def test_sentencepiece_tokens_spell_what_decode_gives_them(decoder: str) -> None:
    # A bare Metaspace decoder made llguidance refuse the tokenizer (every structured output
    # was a 422); ByteFallback then Metaspace made it keep the "▁" that decode turns into a
    # space, so " {" was no JSON to it and " The" inside a string was "▁The".
    tokenizer = _sentencepiece_tokenizer(decoder)
    grammars = Grammars(tokenizer.to_str(), [2], 384)
    space_word = tokenizer.token_to_id("▁the")
    byte_a = tokenizer.token_to_id("<0x41>")
    assert grammars.tokenizer.decode_bytes([space_word]) == b" the"
    assert tokenizer.decode([1, space_word, space_word]) == "the the"
    if decoder == "metaspace":  # no ByteFallback step: decode shows the piece as it is
        assert tokenizer.decode([byte_a]) == "<0x41>"
        assert grammars.tokenizer.decode_bytes([byte_a]) == b"<0x41>"
    else:
        assert grammars.tokenizer.decode_bytes([byte_a, 3 + 0xC3, 3 + 0xA9]) == "Aé".encode()
    matcher = grammars.matcher(StructuredOutput("regex", "( [a-z]+)+"))
    allowed = allowed_tokens([matcher], 384)[0]
    assert allowed[space_word] and not allowed[tokenizer.token_to_id("t")]


@pytest.fixture(scope="module", params=SENTENCEPIECE_DECODERS)
def sentencepiece_engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Engine, Any]]:
    """An engine on a tiny Llama whose tokenizer.json is _sentencepiece_tokenizer's."""
    from tests.fixtures import build_base

    base = build_base(tmp_path_factory.mktemp("base") / f"sp-{request.param}", seed=3)
    tokenizer = _sentencepiece_tokenizer(request.param)
    (base / "tokenizer.json").write_text(tokenizer.to_str())
    with Engine(base, EngineConfig(max_batch_size=8, max_model_len=256)) as eng:
        yield eng, tokenizer


def test_sentencepiece_bases_give_json_that_matches_the_schema(
    sentencepiece_engine: tuple[Engine, Any],
) -> None:
    engine, tokenizer = sentencepiece_engine
    done = engine.generate_many(
        [
            ("The answer is", None, params)
            for seed in range(4)
            for params in [
                SamplingParams(max_tokens=96, temperature=1.0, seed=seed, structured=spec)
                for spec in (SPECS["json"], StructuredOutput.json_schema(PERSON))
            ]
        ],
        timeout=120,
    )
    for c in done:
        assert c.finish_reason == "stop", c.text
        assert _matches("json", c.text), c.text
        # The text is what the output adds to the prompt's decode (its leading space kept).
        prompt = tokenizer.encode("The answer is").ids
        assert tokenizer.decode(prompt + c.token_ids) == tokenizer.decode(prompt) + c.text
