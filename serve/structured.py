"""Structured outputs: compile a request's schema, pattern or grammar with llguidance, and mask
each step's logits to the tokens that keep the output matching it."""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import tokenizers
import torch

from mintvcs.errors import MintError
from mintvcs.serve.sampling import (
    BYTE_PIECE,
    InvalidSamplingParams,
    StructuredOutput,
    is_byte_level,
    special_ids,
    texts_after_a_word,
)
from mintvcs.serve.threads import available_cpus

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compiled grammars kept per engine: clients tend to send the same few schemas again and again,
# and compiling a large schema takes milliseconds to seconds. Bounded in count and in the specs'
# characters too: a compiled grammar takes ~50 bytes of memory per character of its spec, plus
# its lexer, built as requests use it, up to max_lexer_states (then it is compiled afresh, see
# worn_out; llguidance does not tell its size, so it is not counted here).
COMPILED_GRAMMARS = 64
COMPILED_SPEC_CHARS = 2 << 20
# Specs that did not compile are remembered as long (count and characters as above), for this
# long: a client resending a schema that took seconds to fail gets its 400 at once.
FAILED_SPECS = 64
FAILED_SPEC_SECONDS = 60.0
# Compiles run on a pool of their own, this many at once: a schema may take seconds to compile
# (or to fail), and on the event loop's default executor a few of them would hold up every
# other worker-thread job (ref lookups, prompt encoding, /v1/models).
COMPILE_THREADS = 2
_compile_pool: ThreadPoolExecutor | None = None
_compile_pool_lock = threading.Lock()


def compile_pool() -> ThreadPoolExecutor:
    """The threads that compile structured outputs for the HTTP layer (COMPILE_THREADS)."""
    global _compile_pool
    with _compile_pool_lock:
        if _compile_pool is None:
            _compile_pool = ThreadPoolExecutor(COMPILE_THREADS, "mintvcs-grammar")
        return _compile_pool


# llguidance's default limits, with short errors: its verbose ones quote the whole grammar.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)
# llguidance builds a matcher by recursion, ~3 kB of stack for each link of a chain of rules or
# of $refs: on a thread's usual 8 MiB, a 70 kB grammar overflowed it and killed the process
# (SIGSEGV). Compiles run on a thread with this much stack instead, address space only, touched
# as deep as a grammar goes; llguidance's own cap of 65,000 symbols (an error, not a crash)
# keeps the deepest grammar under a fifth of it.
COMPILE_STACK_BYTES = 1 << 30
_stack_size_lock = threading.Lock()


def _on_deep_stack(build: Callable[[], llguidance.LLMatcher]) -> llguidance.LLMatcher:
    """`build()` run on a thread of its own with COMPILE_STACK_BYTES of stack; its result or error."""
    done: Future[llguidance.LLMatcher] = Future()

    def run() -> None:
        try:
            done.set_result(build())
        except BaseException as err:
            done.set_exception(err)

    with _stack_size_lock:  # the size applies to threads started while it is set
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="mintvcs-grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return done.result()


class InvalidStructuredOutput(InvalidSamplingParams):
    """A schema, pattern or grammar that does not compile (the message is llguidance's)."""


class StructuredOutputError(MintError):
    """A request's output could not go on matching its structured output (a grammar limit)."""


def grammar_text(spec: StructuredOutput) -> str:
    """llguidance's grammar for a structured output; InvalidStructuredOutput when it is malformed."""
    try:
        if spec.kind == "json":
            options: JsonCompileOptions = {"whitespace_flexible": not spec.compact}
            if spec.compact:
                options["item_separator"] = ", "
                options["key_separator"] = ": "
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=options)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            # One regular expression: a lexer alternation scales to thousands of options, where
            # a grammar alternation of as many rules passes llguidance's per-step limits.
            options = json.loads(spec.spec)
            return llguidance.LLMatcher.grammar_from_regex("|".join(map(_literal, options)))
        return llguidance.grammar_from("grammar", spec.spec)  # Lark, or GBNF converted to it
    except ValueError as err:
        raise InvalidStructuredOutput(
            f"the {spec.kind} structured output is invalid: {short_error(str(err))}"
        ) from None


def _literal(text: str) -> str:
    """A regular expression (Rust syntax) matching exactly `text`: ASCII punctuation and
    control characters as \\xHH escapes, everything else as it is."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 128 and not c.isalnum() else c for c in text)


def grammar_tokenizer(
    tokenizer_json: str, eos: list[int], vocab_size: int
) -> llguidance.LLTokenizer:
    """llguidance's view of a tokenizer: the bytes each token adds to the text.

    llguidance reads them from tokenizer.json for byte-level and Llama-2-style byte-fallback
    decoders only; it refuses others (a bare Metaspace decoder, WordPiece) or, for some
    (ByteFallback then Metaspace), keeps the "▁" that decode turns into a space. Such
    tokenizers get the bytes that decode gives each token instead (token_bytes).
    InvalidStructuredOutput when the tokenizer has more ids than the model's `vocab_size` rows.
    """
    tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
    ids = max([*tokenizer.get_vocab(with_added_tokens=True).values(), -1]) + 1
    if ids > vocab_size:
        raise InvalidStructuredOutput(
            f"structured outputs are unavailable for this base: its tokenizer does not fit "
            f"its {vocab_size}-token vocabulary (the tokenizer has {ids} ids)"
        )
    native: llguidance.LLTokenizer | None = None
    refusal = ""
    try:
        # n_vocab: the model's rows; ids past the tokenizer's own (padding) are never allowed.
        native = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos or None)
    except ValueError as err:
        refusal = short_error(str(err))
    if native is not None and is_byte_level(tokenizer):
        return native  # the pieces spell their bytes: nothing for decode to disagree with
    pieces, special = token_bytes(tokenizer, ids)
    if native is not None and all(
        native.decode_bytes([token]) == piece
        for token, piece in enumerate(pieces)
        # llguidance marks special tokens with a leading 0xFF, which no UTF-8 text holds
        if token not in special and not piece.startswith(b"\xff")
    ):
        return native
    # The wrapper's tokens are the whole vocabulary: the model's padding rows spell nothing.
    pieces += [b""] * (vocab_size - ids)
    try:
        return llguidance.LLTokenizer(
            llguidance.TokenizerWrapper(_TokenizerBytes(tokenizer, pieces, special, eos)),
            n_vocab=vocab_size,
            eos_token=eos or None,
        )
    except ValueError as err:
        raise InvalidStructuredOutput(
            "structured outputs are unavailable for this base: llguidance takes neither its "
            f"tokenizer.json ({refusal or 'its bytes differ from decode'}) nor the bytes "
            f"decode gives its tokens ({short_error(str(err))})"
        ) from None


def token_bytes(tokenizer: tokenizers.Tokenizer, ids: int) -> tuple[list[bytes], set[int]]:
    """The bytes each of the first `ids` token ids adds to decoded text, and the special ids.

    A token's text is what it adds after a plain word (texts_after_a_word); a byte-fallback
    <0xNN> token of a multi-byte character decodes to U+FFFD, so its byte is taken from the
    piece instead, where the decoder reads such pieces as bytes.
    """
    special = {token for token in special_ids(tokenizer) if token < ids}
    texts = texts_after_a_word(tokenizer, range(ids))
    letter_a = tokenizer.token_to_id("<0x41>")
    bytes_as_pieces = letter_a is not None and tokenizer.decode([letter_a]) == "A"
    pieces = []
    for token, text in enumerate(texts):
        piece = tokenizer.id_to_token(token)
        byte = BYTE_PIECE.fullmatch(piece) if piece is not None else None
        if piece is None:
            pieces.append(b"")  # an id the vocabulary skips
        elif token in special:
            pieces.append(piece.encode())
        elif byte is not None and bytes_as_pieces:
            pieces.append(bytes([int(byte[1], 16)]))
        else:
            pieces.append(text.encode())
    return pieces, special


class _TokenizerBytes:
    """What llguidance.TokenizerWrapper reads: tokens' bytes and a way to tokenize text."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        pieces: list[bytes],
        special: set[int],
        eos: list[int],
    ) -> None:
        self.tokens = pieces
        self.special_token_ids = sorted(special)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = None
        self._encoder = _without_prefix_space(tokenizer)
        self._id_of = {piece: token for token, piece in enumerate(pieces) if piece}
        for token in special:
            self._id_of.pop(pieces[token], None)
        self._longest = max(map(len, self._id_of), default=1)

    def __call__(self, text: bytes) -> list[int]:
        """Tokens whose bytes are exactly `text`: the tokenizer's, or longest pieces first."""
        try:
            ids: list[int] = self._encoder.encode(text.decode(), add_special_tokens=False).ids
        except UnicodeDecodeError:
            ids = []
        if b"".join(self.tokens[token] for token in ids) == text:
            return ids
        return self._greedy(text)

    def _greedy(self, text: bytes) -> list[int]:
        ids = []
        at = 0
        while at < len(text):
            for end in range(min(len(text), at + self._longest), at, -1):
                token = self._id_of.get(text[at:end])
                if token is not None:
                    ids.append(token)
                    at = end
                    break
            else:
                at += 1  # a byte no token spells: llguidance only hints with this
        return ids


def _without_prefix_space(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """A copy of `tokenizer` that does not put "▁" before the text it encodes: llguidance
    tokenizes pieces of the output (forced bytes), not whole prompts."""
    spec = json.loads(tokenizer.to_str())

    def strip(part: dict[str, Any] | None) -> dict[str, Any] | None:
        if not part:
            return part
        if part.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in part else "pretokenizers"
            part[key] = [s for s in map(strip, part.get(key, [])) if s is not None]
            return part
        if part.get("type") == "Prepend":
            return None
        if part.get("type") == "Metaspace":
            part["prepend_scheme"] = "never"
            part.pop("add_prefix_space", None)
        return part

    spec["normalizer"] = strip(spec.get("normalizer"))
    spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


class Grammars:
    """The structured outputs of one tokenizer: a fresh matcher per request from grammars compiled once."""

    def __init__(self, tokenizer_json: str, eos_ids: Iterable[int], vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.tokenizer = grammar_tokenizer(tokenizer_json, sorted(eos_ids), vocab_size)
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._compiling: dict[StructuredOutput, Future[llguidance.LLMatcher]] = {}
        # Recent compile failures: their spec -> (when they are forgotten, the message).
        self._failed: OrderedDict[StructuredOutput, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, spec: StructuredOutput) -> llguidance.LLMatcher | None:
        """`spec`'s compiled matcher if it is cached, else None, without compiling or waiting;
        InvalidStructuredOutput if it failed to compile in the last FAILED_SPEC_SECONDS."""
        with self._lock:
            return self._cached(spec)

    def _cached(self, spec: StructuredOutput) -> llguidance.LLMatcher | None:
        known = self._compiled.get(spec)
        if known is not None:
            self._compiled.move_to_end(spec)
            return known
        failed = self._failed.get(spec)
        if failed is not None:
            if failed[0] > time.monotonic():
                raise InvalidStructuredOutput(failed[1])
            del self._failed[spec]
        return None

    def compile(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled, unstarted matcher of `spec` (kept for next time); InvalidStructuredOutput
        if it does not compile. Callers asking for a spec being compiled wait for that compile."""
        with self._lock:
            known = self._cached(spec)
            if known is not None:
                return known
            running = self._compiling.get(spec)
            if running is None:
                mine: Future[llguidance.LLMatcher] = Future()
                self._compiling[spec] = mine
        if running is not None:
            return running.result()
        try:
            # Outside the lock: compiling drops the GIL and may take a while for a large schema.
            matcher = _on_deep_stack(lambda: self._build(spec))
        except BaseException as err:
            with self._lock:
                del self._compiling[spec]
                if isinstance(err, InvalidStructuredOutput):
                    self._remember_failure(spec, str(err))
            mine.set_exception(err)
            raise
        with self._lock:  # cached as it stops being in progress: no caller compiles it again
            del self._compiling[spec]
            self._compiled[spec] = matcher
            while len(self._compiled) > COMPILED_GRAMMARS or (
                len(self._compiled) > 1
                and sum(len(s.spec) for s in self._compiled) > COMPILED_SPEC_CHARS
            ):
                self._compiled.popitem(last=False)
        mine.set_result(matcher)
        return matcher

    def _remember_failure(self, spec: StructuredOutput, message: str) -> None:
        self._failed[spec] = (time.monotonic() + FAILED_SPEC_SECONDS, message)
        while len(self._failed) > FAILED_SPECS or (
            len(self._failed) > 1 and sum(len(s.spec) for s in self._failed) > COMPILED_SPEC_CHARS
        ):
            self._failed.popitem(last=False)

    def _build(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(
            self.tokenizer, grammar_text(spec), log_level=0, limits=_LIMITS
        )
        # A first mask too, on two copies: some grammars compile but pass the parser's per-step
        # limits at once, and copies share the lexer's budget (a regex like a{1000}{1000} gets
        # one mask out of it, then every later copy fails).
        # Then one allowed token consumed: a grammar of thousands of alternatives passes the
        # parser's row limit only there.
        copies = [matcher.deep_copy() for _ in range(2)]
        for copy in copies:
            bits = token_bitmask([copy], self.vocab_size)
        allowed = torch.nonzero(blocked_tokens(bits, self.vocab_size, bits.device)[0] == 0)
        if len(allowed) and not copies[-1].is_error():
            copies[-1].consume_token(int(allowed[0]))
        for failed in (matcher, *copies):
            if failed.is_error():
                raise InvalidStructuredOutput(
                    f"the {spec.kind} structured output is invalid: {matcher_error(failed)}"
                )
        return matcher

    def matcher(self, spec: StructuredOutput) -> llguidance.LLMatcher:
        """A new matcher for one request's output."""
        return self.compile(spec).deep_copy()

    def renew(self, spec: StructuredOutput, worn: llguidance.LLMatcher) -> llguidance.LLMatcher:
        """`spec` compiled afresh in place of `worn`, its compiled grammar worn out (worn_out()):
        its copies share its lexer's states, so once they reach llguidance's cap every copy
        would fail. The first request to find it worn compiles; the others get that compile."""
        with self._lock:
            if self._compiled.get(spec) is worn:
                del self._compiled[spec]
        return self.compile(spec)


def worn_out(error: str) -> bool:
    """Whether a matcher failed on its lexer's state cap (max_lexer_states). The copies of one
    compiled grammar share its lexer, built lazily as outputs explore it: their states add up
    across requests, and each grammar's lexer may grow to the cap (~170 MiB measured) with use.
    A grammar meeting it is compiled afresh (Grammars.renew), for the requests using it too."""
    return "too many states" in error


# Rows from which a step's masks are computed on llguidance's thread pool (only for a GPU's steps:
# on CPU the step's own threads are every core, and the masks of 32 rows take under a millisecond).
PARALLEL_MASK_ROWS = 4
_EXECUTOR: llguidance.LLExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _executor() -> llguidance.LLExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            # Sized by the CPUs this process may use (affinity, a cgroup quota), not the host's:
            # llguidance's default takes 80% of every CPU it sees.
            _EXECUTOR = llguidance.LLExecutor(num_threads=min(8, available_cpus()))
        return _EXECUTOR


# The most of an llguidance error a message quotes.
ERROR_CHARS = 300


def matcher_error(matcher: llguidance.LLMatcher) -> str:
    """A failed matcher's error, short (short_error)."""
    return short_error(str(matcher.get_error()))


def short_error(message: str) -> str:
    """An llguidance error without its verbosity marker, the backtrace of a Rust panic (dozens
    of lines), or anything past ERROR_CHARS; its bare NoExtensionBias explained."""
    text = message.replace("<non-verbose/>", "").split("<backtrace>", 1)[0].strip()
    if text == "NoExtensionBias":  # what a $ref cycle without a schema in it ends in
        text += " (a $ref that refers back to itself with no schema in between describes no value)"
    if len(text) > ERROR_CHARS:
        text = text[: ERROR_CHARS - 3] + "..."
    return text


def token_bitmask(
    matchers: Sequence[llguidance.LLMatcher], vocab_size: int, *, parallel: bool = False
) -> torch.Tensor:
    """int32 [len(matchers), ceil(vocab_size / 32)] on the CPU: bit j of word w set when token
    32 w + j may come next. `parallel`: on llguidance's thread pool, a row per task."""
    words = (vocab_size + 31) // 32
    bits = torch.zeros((len(matchers), words), dtype=torch.int32)
    if parallel and len(matchers) >= PARALLEL_MASK_ROWS:
        rows = [(matcher, row) for row, matcher in enumerate(matchers)]
        _executor().unsafe_compute_mask_ptr(rows, bits.data_ptr(), words * 4, len(matchers))
        return bits
    for row, matcher in enumerate(matchers):
        matcher.unsafe_compute_mask_ptr(bits[row].data_ptr(), words * 4)
    return bits


def blocked_tokens(bits: torch.Tensor, vocab_size: int, device: torch.device) -> torch.Tensor:
    """bool [rows, vocab_size] on `device`, True for each token a token_bitmask() row does not allow."""
    if device.type == "cpu":
        # Bit j of 32-bit word w is token 32 w + j; little-endian bytes keep that order.
        unpacked = np.unpackbits(bits.numpy().view(np.uint8), axis=1, bitorder="little")
        return torch.from_numpy(unpacked[:, :vocab_size] == 0)
    # On a GPU: move the packed words (1/8 of a bool mask's bytes) and unpack them there.
    return unpack_blocked(bits.to(device, non_blocking=True), vocab_size)


def unpack_blocked(words: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """blocked_tokens() with torch ops on the words' own device."""
    # Byte by byte (little-endian words keep the token order): one byte of scratch per token.
    packed = words.view(torch.uint8)
    shifts = torch.arange(8, dtype=torch.uint8, device=words.device)
    allowed = (packed.unsqueeze(-1) >> shifts) & 1
    return (allowed == 0).view(words.shape[0], -1)[:, :vocab_size]
