"""Sampling parameters, the sampler (greedy, temperature, top-k, top-p, seeded) and incremental detokenizing."""

from __future__ import annotations

import codecs
import json
import math
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from mintvcs.errors import MintError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy (vLLM's _SAMPLING_EPS)


class InvalidSamplingParams(MintError):
    """A sampling parameter is out of range."""


# The most alternatives a request may ask for per token (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20
MAX_CACHE_SALT = 1024  # characters of a cache_salt (vLLM suggests 43: 256 random bits in base64)
# A log-probability JSON cannot carry (-inf, NaN) is reported as this, as vLLM does.
LOGPROB_FLOOR = -9999.0


# Structured-output kinds: what StructuredOutput.spec holds for each.
STRUCTURED_KINDS = {
    "json": "a JSON schema, as JSON text",
    "regex": "a regular expression the whole output must match",
    "choice": "a JSON list of the strings the output may be",
    "grammar": "a context-free grammar in Lark or GBNF syntax",
}
MAX_STRUCTURED_SPEC = 1 << 20  # characters of a schema, pattern or grammar


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match (vLLM's structured outputs); enforced token by token."""

    kind: str  # one of STRUCTURED_KINDS
    spec: str
    # JSON only: allow no whitespace between tokens but the separators' (vLLM's option): some
    # models otherwise write whitespace until max_tokens.
    compact: bool = False

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidSamplingParams(
                f"structured output kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r:.40}"
            )
        if not isinstance(self.spec, str) or not 0 < len(self.spec) <= MAX_STRUCTURED_SPEC:
            raise InvalidSamplingParams(
                f"a {self.kind} structured output needs {STRUCTURED_KINDS[self.kind]}, as a "
                f"non-empty string of at most {MAX_STRUCTURED_SPEC} characters"
            )

    @classmethod
    def json_schema(cls, schema: object, *, compact: bool = False) -> StructuredOutput:
        """Output that is JSON valid against `schema` (a dict, a bool, or JSON text)."""
        return cls("json", schema if isinstance(schema, str) else json.dumps(schema), compact)

    @classmethod
    def choice(cls, options: Sequence[str]) -> StructuredOutput:
        """Output that is exactly one of `options`."""
        if (
            isinstance(options, str)
            or not options
            or not all(isinstance(o, str) and o for o in options)
        ):
            raise InvalidSamplingParams("choice needs a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(options)))


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_tokens: int | None = 16  # None: until EOS, a stop, or the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Log-probabilities of each generated (or prompt) token and of the N likeliest alternatives;
    # None = not computed, 0 = the token's own only.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # OpenAI's penalties on tokens already generated: presence subtracts once per token seen,
    # frequency once per occurrence. repetition (> 1 discourages) divides a positive logit and
    # multiplies a negative one of any token in the prompt or the output, as vLLM and HF do.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # EOS, stop token ids and stop strings cannot end the output before this
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest (after temperature)
    # (token id, added to its logit); a {token id: bias} mapping (vLLM's and OpenAI's form) is
    # taken too, and kept as these pairs
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's allowed_token_ids: only these tokens may be generated (every other logit is -inf
    # before the penalties); None allows all
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's cache_salt: only requests with the same salt share cached prompt prefixes, so one
    # tenant cannot learn from the cache what another sent. Not a sampling choice, but it
    # travels with the request's other options.
    cache_salt: str | None = None
    structured: StructuredOutput | None = None  # a schema, pattern or grammar the output must match
    # False keeps special tokens' text in the output: a tool-call parser whose markers are
    # special tokens (<tool_call> in some Hermes checkpoints) reads them there, as vLLM's does.
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.allowed_token_ids is not None:
            allowed = tuple(int(t) for t in self.allowed_token_ids)
            if not allowed:
                raise InvalidSamplingParams(
                    "allowed_token_ids must name at least one token id (None allows all)"
                )
            object.__setattr__(self, "allowed_token_ids", allowed)
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise InvalidSamplingParams(
                f"max_tokens must be None or an integer >= 1, got {self.max_tokens!r}"
            )
        for name in ("top_k", "min_tokens", "seed", "logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                # A float here failed inside a step, and with it every request in the batch.
                raise InvalidSamplingParams(f"{name} must be an integer, got {value!r}")
        if self.top_k == -1:  # vLLM's spelling of "off"
            object.__setattr__(self, "top_k", 0)
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidSamplingParams(
                f"temperature must be in [0, 100], got {self.temperature}; 0 means greedy"
            )
        if self.temperature < GREEDY_BELOW:
            # As vLLM: below this, logits / temperature overflow fp32 and sampling is argmax anyway.
            object.__setattr__(self, "temperature", 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidSamplingParams(
                f"top_k must be 0 or -1 (off) or positive, got {self.top_k}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidSamplingParams(
                f"stop must be a string or a sequence of non-empty strings, got {self.stop!r:.80}"
            )
        if not isinstance(self.skip_special_tokens, bool):
            raise InvalidSamplingParams(
                f"skip_special_tokens must be true or false, got {self.skip_special_tokens!r}"
            )
        salt = self.cache_salt
        if salt is not None and not (isinstance(salt, str) and 0 < len(salt) <= MAX_CACHE_SALT):
            raise InvalidSamplingParams(
                f"cache_salt must be a non-empty string of at most {MAX_CACHE_SALT} characters"
            )
        pairs = self.logit_bias.items() if isinstance(self.logit_bias, Mapping) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in pairs))
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidSamplingParams(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidSamplingParams(
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}; 1 is off"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidSamplingParams(f"min_p must be in [0, 1], got {self.min_p}")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise InvalidSamplingParams(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise InvalidSamplingParams("logit_bias values must be in [-100, 100]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidSamplingParams(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidSamplingParams(
                    f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}"
                )

    @property
    def adjusts_logits(self) -> bool:
        """Whether a penalty, a bias, allowed_token_ids or min_tokens changes the logits before a token is picked."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.logit_bias
            or self.allowed_token_ids is not None
        )

    @property
    def greedy(self) -> bool:
        """Whether this request takes the argmax at every step."""
        return self.temperature == 0.0 or self.top_k == 1

    def generator(self) -> torch.Generator:
        """A CPU generator seeded from `seed` (or fresh entropy), private to one request."""
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator().manual_seed(seed)


# A nucleus (top_p) is looked for among this many likeliest tokens before a row is sorted in
# full: sorting a whole vocabulary costs more than a decode step's matmuls on a CPU.
NUCLEUS_CANDIDATES = 256


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from fp32 logits [vocab]; the only randomness is one draw from `generator`."""
    if params.greedy or generator is None:
        return int(torch.argmax(logits))
    return sample_rows(logits.unsqueeze(0), [params], [generator])[0]


def sample_rows(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> list[int]:
    """One token per row of fp32 logits [rows, vocab], each with its own params and generator.

    Temperature, then top-k, min_p and top-p cut each row to the tokens they keep (a token tied
    with the last one kept is kept too); the token is then drawn by inverse CDF over the kept
    tokens in vocabulary order, in float64, from one float64 uniform number of the row's
    generator (on the CPU, so for the same logits a seed gives the same token on any device,
    whatever else is in the batch). Every step is a
    batched op over the rows: no row is sorted unless its nucleus lies past the
    NUCLEUS_CANDIDATES likeliest tokens.
    """
    vocab = logits.shape[1]
    device = logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)

    # One [rows, vocab] buffer, changed in place from here on: at a 128k vocabulary each fresh
    # one is 16 MB of newly mapped pages, which cost more than the arithmetic done on them.
    weights = logits.float() / column([p.temperature for p in params])
    # Unnormalised probabilities, the likeliest of each row at exactly 1.
    weights.sub_(weights.max(dim=-1, keepdim=True).values).exp_()
    top_ks = [min(p.top_k, vocab) for p in params]
    if any(top_ks):
        kth = torch.topk(weights, max(top_ks), dim=-1).values
        at = torch.tensor([max(k, 1) - 1 for k in top_ks], device=device).unsqueeze(1)
        floor = torch.where(column([float(k > 0) for k in top_ks]) > 0, kth.gather(1, at), 0.0)
        _keep_at_least(weights, floor)
    if any(p.min_p for p in params):
        _keep_at_least(weights, column([p.min_p for p in params]))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        index = torch.tensor(nucleus, device=device)
        kept = weights[index]
        weights[index] = _keep_at_least(
            kept, _nucleus_floor(kept, [params[i].top_p for i in nucleus])
        )
    # float64, the running sum and the draw alike: in float32 a token whose weight is under half
    # an ulp of the sum before it adds nothing to it and can never be drawn (most of a 128k
    # vocabulary's tail), and a 24-bit draw cannot tell apart probabilities under 2**-24.
    cum = torch.cumsum(weights, dim=-1, dtype=torch.float64)
    total = cum[:, -1:]
    draws = torch.tensor(
        [torch.rand((), dtype=torch.float64, generator=g).item() for g in generators],
        dtype=torch.float64,
    ).to(device)
    # Below the total even when u * total rounds up to it: the draw lands on a kept token.
    target = torch.minimum(
        draws.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    # side="right": the first token whose cumulative weight passes the target has weight > 0.
    tokens = torch.searchsorted(cum, target, right=True).squeeze(1).clamp_(max=vocab - 1)
    return [int(t) for t in tokens.tolist()]


def _keep_at_least(weights: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the weights under each row's floor [rows, 1] (NaN too); returns weights."""
    return weights.masked_fill_(weights.ge(floor).logical_not_(), 0.0)


def _nucleus_floor(weights: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    """Per row of weights [rows, vocab], the weight of the last token of its top-p nucleus [rows, 1].

    Looked for among the NUCLEUS_CANDIDATES likeliest tokens, then 16 times as many, then the
    whole sorted row, each time only for the rows whose nucleus was not found yet.
    """
    vocab = weights.shape[1]
    total = weights.sum(dim=-1, keepdim=True)
    need = torch.tensor(top_ps, dtype=torch.float32, device=weights.device).unsqueeze(1) * total
    floor = torch.zeros_like(total)
    pending = torch.arange(weights.shape[0], device=weights.device)
    for k in (NUCLEUS_CANDIDATES, 16 * NUCLEUS_CANDIDATES, vocab):
        k = min(k, vocab)
        top = torch.topk(weights[pending], k, dim=-1).values  # sorted, likeliest first
        reached = top.cumsum(dim=-1) >= need[pending]
        if k == vocab:  # float rounding may leave the last sum a hair short: take the last token
            reached[:, -1] = True
        found = reached[:, -1]
        first = reached.to(torch.uint8).argmax(dim=-1, keepdim=True)  # the first True
        floor[pending[found]] = top.gather(1, first)[found]
        pending = pending[~found]
        if pending.numel() == 0 or k == vocab:
            break
    return floor


class PenaltyHistory:
    """What a request's penalties look at, kept across its steps on the logits' device: the
    distinct tokens of its prompt and output (as a set and as an index tensor), how often
    each token is in its output, and the mask of its allowed_token_ids. Each step adds only the tokens sampled since the last one;
    rebuilding them from the id lists cost O(prompt) per row and step on the step thread.
    Penalties then touch only those tokens' logits, not the whole vocabulary."""

    def __init__(self, prompt_ids: Sequence[int], vocab: int, device: torch.device) -> None:
        self.prompt_ids = prompt_ids
        self.vocab = vocab
        self.device = device
        self._seen: set[int] | None = None  # prompt and output tokens, made on first use
        self._seen_ids: torch.Tensor | None = None
        self._produced: set[int] = set()  # output tokens
        self._produced_ids = torch.zeros(0, dtype=torch.long, device=device)
        self._counts: torch.Tensor | None = None  # made on the first output token
        self._counted = 0  # output tokens already taken in
        self._barred: torch.Tensor | None = None  # True where allowed_token_ids leaves a token out

    def barred(self, allowed: Sequence[int]) -> torch.Tensor:
        """A bool mask [vocab], True for each token not in `allowed` (made once)."""
        if self._barred is None:
            barred = torch.ones(self.vocab, dtype=torch.bool, device=self.device)
            barred[self._ids(list(allowed))] = False
            self._barred = barred
        return self._barred

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _take(self, output_ids: Sequence[int]) -> None:
        """Take in the output tokens sampled since the last call (`output_ids` only grows)."""
        new = [int(t) for t in output_ids[self._counted :]]
        self._counted = len(output_ids)
        if not new:
            return
        if self._counts is None:
            self._counts = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        if len(new) == 1:  # the usual step: one token more
            self._counts[new[0]] += 1.0
        else:
            self._counts.index_add_(0, self._ids(new), torch.ones(len(new), device=self.device))
        fresh = sorted(set(new) - self._produced)
        if fresh:
            self._produced.update(fresh)
            self._produced_ids = torch.cat([self._produced_ids, self._ids(fresh)])
        if self._seen is not None:
            unseen = sorted(set(new) - self._seen)
            if unseen:
                self._seen.update(unseen)
                assert self._seen_ids is not None
                self._seen_ids = torch.cat([self._seen_ids, self._ids(unseen)])

    def seen_ids(self, output_ids: Sequence[int]) -> torch.Tensor:
        """The distinct token ids of the prompt and `output_ids`, as a long tensor."""
        self._take(output_ids)
        if self._seen is None:
            self._seen = {*self.prompt_ids, *self._produced}
            self._seen_ids = self._ids(sorted(self._seen))
        assert self._seen_ids is not None
        return self._seen_ids

    def output_counts(self, output_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct token ids of `output_ids` and how often each is there (float)."""
        self._take(output_ids)
        if self._counts is None:
            return self._produced_ids, torch.zeros(0, device=self.device)
        return self._produced_ids, self._counts[self._produced_ids]


def adjust_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    stop_ids: Collection[int],
    history: PenaltyHistory | None = None,
) -> torch.Tensor:
    """A copy of one row of logits [vocab] with allowed_token_ids, min_tokens, logit_bias and the
    penalties applied, in vLLM's order. `history` is the request's, kept from step to step (a fresh one without)."""
    out = logits.float().clone()
    device = out.device
    if history is None:
        history = PenaltyHistory(prompt_ids, out.shape[0], device)
    if params.allowed_token_ids is not None:  # first, as vLLM's built-in logits processor
        out.masked_fill_(history.barred(params.allowed_token_ids), -math.inf)
    if params.min_tokens and len(output_ids) < params.min_tokens and stop_ids:
        out[torch.tensor(sorted(stop_ids), device=device)] = -math.inf
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias, strict=True)
        out.index_add_(0, torch.tensor(ids, device=device), torch.tensor(biases, device=device))
    repetition = params.repetition_penalty != 1.0
    occurrence = bool(params.presence_penalty or params.frequency_penalty) and bool(output_ids)
    if not (repetition or occurrence):
        return out
    if repetition:
        seen = history.seen_ids(output_ids)
        values = out[seen]
        out[seen] = torch.where(
            values > 0, values / params.repetition_penalty, values * params.repetition_penalty
        )
    if occurrence:
        produced, counts = history.output_counts(output_ids)
        out[produced] -= params.frequency_penalty * counts + params.presence_penalty
    return out


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability under the model (raw logits, before temperature, top-k and top-p) and the likeliest alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), likeliest first
    # The token's place in the whole vocabulary, 1 for the likeliest: how many tokens are at
    # least as likely (ties count ahead, as vLLM ranks); 0 when not computed.
    rank: int = 0

    def keep_top(self, n: int) -> TokenLogprobs:
        """These logprobs with at most the `n` likeliest alternatives (itself when it has no more)."""
        return self if len(self.top) <= n else replace(self, top=self.top[:n])


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprobs]:
    """Log-probabilities of `tokens` [R] under fp32 logits [R, vocab], with each one's rank and the `top` likeliest of each row."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    logprobs = torch.nan_to_num(logprobs, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
    index = torch.tensor(list(tokens), dtype=torch.long, device=logprobs.device).unsqueeze(1)
    picked = logprobs.gather(1, index)
    ranks = (logprobs >= picked).sum(dim=1).tolist()
    chosen = picked.squeeze(1).tolist()
    if top:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[1]), dim=-1)
        alternatives = [
            tuple(zip(row_ids, row_values, strict=True))
            for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        alternatives = [()] * len(chosen)
    return [
        TokenLogprobs(token, value, alts, rank)
        for token, value, alts, rank in zip(tokens, chosen, alternatives, ranks, strict=True)
    ]


# Prompt tokens decoded ahead of the output (as vLLM does): a SentencePiece (Metaspace) decoder
# drops the space of the first token it decodes, which must not be the first generated word.
CONTEXT_TOKENS = 5
# A UTF-8 character spans at most 4 bytes, so at most 3 tokens of one precede its last.
_MAX_CONTINUATION_TOKENS = 3


BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a byte-fallback vocabulary's byte tokens


def _byte_level_alphabet() -> dict[str, int]:
    """The byte each character of a byte-level (GPT-2 style) vocabulary stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF = _byte_level_alphabet()


def _token_bytes(tokenizer: Any, token_id: int, byte_level: bool) -> bytes | None:
    """The bytes a token stands for: a <0xNN> piece, a byte-level piece, or its text."""
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        return None
    byte = BYTE_PIECE.fullmatch(piece)
    # A decoder without a ByteFallback step (a bare Metaspace) shows the piece as written.
    if byte is not None and tokenizer.decode([token_id], skip_special_tokens=False) != piece:
        return bytes([int(byte[1], 16)])
    if byte_level and all(c in _BYTE_OF for c in piece):
        return bytes(_BYTE_OF[c] for c in piece)
    return str(piece).encode()


def is_byte_level(tokenizer: Any) -> bool:
    """Whether the tokenizer's decoder reads pieces as GPT-2 byte characters (alone or in a Sequence)."""
    getstate = getattr(getattr(tokenizer, "decoder", None), "__getstate__", None)
    state = getstate() if getstate is not None else None  # the decoder as JSON bytes
    return isinstance(state, bytes) and b'"type":"ByteLevel"' in state


def special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens (BOS, EOS, ...), which decoded text skips."""
    return {token for token, added in tokenizer.get_added_tokens_decoder().items() if added.special}


def texts_after_a_word(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """The text each token adds after a plain word, special tokens kept: decode([word, token])
    less decode([word]), in one batch.

    Decoded alone, a SentencePiece token loses its leading space (a Metaspace or Llama-2
    decoder strips the first one: "▁the" is "the", "▁" nothing) and a WordPiece "##" piece
    keeps its "##"; after a word each reads as it does inside a text. A tokenizer with no such
    word (or whose decoder changes the word's text) gives each token's text alone.
    """
    ids = list(ids)
    word = _plain_word(tokenizer)
    if word is None:
        alone = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
        return [str(text) for text in alone]
    shown = str(tokenizer.decode([word], skip_special_tokens=False))
    after = tokenizer.decode_batch([[word, i] for i in ids], skip_special_tokens=False)
    # Alone only where the word's text does not stay ahead: one decode per token, not two.
    return [
        str(text)[len(shown) :]
        if str(text).startswith(shown)
        else str(tokenizer.decode([token], skip_special_tokens=False))
        for token, text in zip(ids, after, strict=True)
    ]


# The words texts_after_a_word tries first: one of them is usually a single token.
_PLAIN_WORDS = ("the", "a", "x", "e")


def _plain_word(tokenizer: Any) -> int | None:
    """A token that decodes to letters, alone and before another token alike."""

    def plain(token: int) -> bool:
        text = str(tokenizer.decode([token], skip_special_tokens=False))
        return text.isalnum() and str(
            tokenizer.decode([token, token], skip_special_tokens=False)
        ).startswith(text)

    for word in _PLAIN_WORDS:
        ids = tokenizer.encode(word, add_special_tokens=False).ids
        if len(ids) == 1 and plain(ids[0]):
            return int(ids[0])
    special = special_ids(tokenizer)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return next((t for t in range(size) if t not in special and plain(t)), None)


def incomplete_tail(tokenizer: Any, ids: Sequence[int]) -> tuple[int, str]:
    """How many of the last ids hold a character their bytes leave unfinished (0: none; up to 3,
    and up to 3 more back to the start of a character that a token of those begins inside),
    and the text those tokens hold before it (" 世" of a byte-level piece " 世" + 2 bytes of "界").

    Only the start of a valid UTF-8 character counts (a prompt of ids cut inside one, which the
    output may complete); stray or invalid bytes are text as they decode (U+FFFD). Tokenizers
    whose pieces do not show their bytes (no id_to_token) have none.
    """
    none = (0, "")
    if not ids or not hasattr(tokenizer, "id_to_token"):
        return none
    byte_level = is_byte_level(tokenizer)
    pieces = []
    for token_id in ids[-_MAX_CONTINUATION_TOKENS:]:
        piece = _token_bytes(tokenizer, token_id, byte_level)
        if piece is None:
            return none
        pieces.append(piece)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(b"".join(pieces))  # keeps back the start of a character, if valid so far
    held = len(decoder.getstate()[0])
    if not held:
        return none
    covered = 0  # the tokens that hold those bytes, from the last one back
    for count, piece in enumerate(reversed(pieces), 1):
        covered += len(piece)
        if covered >= held:
            tail = pieces[-count:]
            # A byte-level piece may begin inside the character before ("👩" ends in the piece
            # that starts "💻"): its lead alone would decode to U+FFFD, so the tokens that hold
            # it go back to where that character starts.
            earlier = ids[: len(ids) - count]
            for back in range(1, min(_MAX_CONTINUATION_TOKENS, len(earlier)) + 1):
                if not _continues_a_character(tail[0]):
                    break
                piece = _token_bytes(tokenizer, earlier[-back], byte_level)
                if piece is None:
                    break
                tail = [piece, *tail]
            if _continues_a_character(tail[0]):
                tail = pieces[-count:]  # stray bytes: no character starts within reach
            lead = b"".join(tail)[: len(b"".join(tail)) - held]
            return len(tail), lead.decode("utf-8", errors="replace")
    return none


def _continues_a_character(piece: bytes) -> bool:
    """Whether a token's bytes begin with a UTF-8 continuation byte (inside a character)."""
    return bool(piece) and 0x80 <= piece[0] <= 0xBF


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete characters.

    Each token's text is decode(window + token) less decode(window), the window starting at
    the first token of the last text emitted (at first the prompt's last CONTEXT_TOKENS, moved
    back to a character's start), vLLM's offsets: the window always starts on a character
    boundary, as a byte-fallback decoder needs (a run of <0xNN> tokens cut inside a character
    decodes to U+FFFD whole), and a token costs a decode of a few tokens, not of the whole
    output (that cost 0.85 ms per sequence and step at 4,000 tokens, on the step thread).
    """

    def __init__(
        self, tokenizer: Any, context: Sequence[int] = (), *, skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._window = self._context_window(list(context))  # the ids decoded together
        self._counted = len(self._window)  # those of the window whose text is in self.text
        # The last tokens of a prompt of ids cut inside a character (a client continuing an
        # output max_tokens cut there): an output token that completes it brings the whole
        # character, as tokenizers' DecodeStream gives it; one that does not leaves the
        # prompt's U+FFFD out of the output.
        self._open_tail = incomplete_tail(tokenizer, self._window) if tokenizer else (0, "")
        self.text = ""
        self._pending = ""  # text of the uncounted ids, which ends inside a character
        self._skipped: dict[int, bool] = {}  # token id -> a special token that decode skips

    def _decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def _context_window(self, context: list[int]) -> list[int]:
        """The prompt's last CONTEXT_TOKENS, widened (by up to 3) to start on a character."""
        if self.tokenizer is None or len(context) <= CONTEXT_TOKENS:
            return context
        start = len(context) - CONTEXT_TOKENS
        reach = min(_MAX_CONTINUATION_TOKENS, start)
        back = self._steps_to_character_start(context, start, reach)
        if back is not None:
            return context[start - back :]
        for back in range(reach + 1):
            if not self._decode(context[start - back :]).startswith("\ufffd"):
                return context[start - back :]
        return context[start:]  # the prompt itself holds U+FFFD or invalid bytes there

    def _steps_to_character_start(self, context: list[int], start: int, reach: int) -> int | None:
        """How many tokens before `start` the character it is inside begins, read from the
        tokens' bytes (None: the pieces do not show them, or no start within `reach`).

        Decoding cannot tell: a byte-fallback decoder turns a whole <0xNN> run into U+FFFD once
        a byte in it is invalid, and a prompt cut inside a character ends in such a byte.
        """
        if not hasattr(self.tokenizer, "id_to_token"):
            return None
        byte_level = is_byte_level(self.tokenizer)
        for back in range(reach + 1):
            piece = _token_bytes(self.tokenizer, context[start - back], byte_level)
            if piece is None:
                return None
            if not _continues_a_character(piece):
                return back
        return None  # stray continuation bytes: no character starts within reach

    def add(self, token_id: int) -> str:
        """Append a token; return the new stable text (may be empty while a character is incomplete)."""
        if self.tokenizer is None:
            return ""
        self._window.append(token_id)
        before = self._decode(self._window[: self._counted])
        after = self._decode(self._window)
        start = self._counted  # the window's first token of the new text
        tail, lead = self._open_tail
        shown = None  # the text shown before the prompt's unfinished character ("" at the start)
        if tail and not after.startswith(before):
            shown = self._decode(self._window[: self._counted - tail]) + lead
        if after.startswith(before):
            new = after[len(before) :]
        elif shown is not None and after.startswith(shown):
            # The prompt's unfinished character is completed: its text starts the output's.
            new = after[len(shown) :]
            start = self._counted - tail
        else:
            # A byte-fallback decoder turns a whole run of <0xNN> tokens into U+FFFD, one per
            # token, once a byte in it is invalid: the characters of the run already shown too
            # ("中" then a stray byte decodes to four). The new tokens' own text, decoded alone,
            # keeps what was shown and gives one U+FFFD per broken byte.
            new = self._decode(self._window[self._counted :])
        if after.endswith("\ufffd"):
            self._pending = new
            return ""
        self._pending = ""
        if new:  # the window moves to this text's first token; a token with none keeps it
            del self._window[:start]
            self._open_tail = (0, "")
        elif self._is_skipped(token_id):
            # The text is the same with or without it: kept out of the window, so that a run of
            # them (EOS after EOS under ignore_eos) does not make every decode longer.
            self._window.pop()
        self._counted = len(self._window)
        self.text += new
        return new

    def _is_skipped(self, token_id: int) -> bool:
        """Whether decode leaves `token_id` out (a special token under skip_special_tokens)."""
        if not self.skip_special_tokens:
            return False
        known = self._skipped.get(token_id)
        if known is None:
            decode = self.tokenizer.decode
            known = self._skipped[token_id] = (
                decode([token_id], skip_special_tokens=True) == ""
                and decode([token_id], skip_special_tokens=False) != ""
            )
        return known

    def flush(self) -> str:
        """At the end of a sequence: accept the pending tail as decoded (replacement characters included)."""
        self.text += self._pending
        self._pending = ""
        return self.text


def find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Index of the earliest stop string in text that ends at or after `start`, or -1."""
    best = -1
    for stop in stops:
        i = text.find(stop, max(0, start - len(stop) + 1))
        if i != -1 and (best == -1 or i < best):
            best = i
    return best


def stop_tail_start(text: str, stops: tuple[str, ...], sent: int = 0) -> int:
    """Where the longest tail of text that is a proper prefix of a stop string begins (len(text): none).

    Only tails past `sent` are looked at: a tail that begins earlier was such a prefix already
    when that text was sent, so it was held back then (a prefix of a prefix is one); this keeps
    a long stop string from making each token's check go over the whole text.
    """
    longest = max(len(stop) for stop in stops)
    for start in range(max(sent, len(text) - longest + 1), len(text)):
        tail = text[start:]
        # Only a proper prefix can still become a stop string that ends in text not yet decoded.
        if any(len(tail) < len(stop) and stop.startswith(tail) for stop in stops):
            return start
    return len(text)
