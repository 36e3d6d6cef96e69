"""Read a local HF checkpoint directory: config.json, (sharded) safetensors and tokenizer.json."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mintvcs.checkpoint import (
    SUPPORTED_ARCHITECTURES,
    CheckpointError,
    architecture,
    lfs_pointer_error,
    read_json,
    resolved_heads,
    safetensors_files,
    safetensors_header,
)
from mintvcs.errors import MintError, cannot_read

log = logging.getLogger("mintvcs.serve")

# RoPE variants whose frequencies we compute exactly as transformers does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


class UnsupportedModelError(MintError):
    """The checkpoint is of an architecture or a configuration the engine does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_theta`/`rope_scaling` or `rope_parameters`."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {self.rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise UnsupportedModelError(f"rope scaling factor must be positive, got {self.factor}")
        if not self.theta > 0:  # NaN too: every rotation, and so every output, would be NaN
            raise UnsupportedModelError(f"rope_theta must be positive, got {self.theta}")


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family model, read from config.json."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # (field, where its value came from) for the shape fields config.json does not give.
    implied: tuple[tuple[str, str], ...] = field(default=(), compare=False, repr=False)
    # The dtype its weights are stored in (torch_dtype; transformers 5: dtype), "float16" say.
    stored_dtype: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim <= 0:
            raise UnsupportedModelError(f"{self.describe('head_dim')} must be positive")
        if self.head_dim % 2:
            # RoPE rotates the head's two halves into each other (transformers refuses it too).
            raise UnsupportedModelError(
                f"RoPE needs an even head_dim, got {self.describe('head_dim')}"
            )
        if self.num_key_value_heads <= 0:
            raise UnsupportedModelError(
                f"{self.describe('num_key_value_heads')} must be a positive integer"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"{self.describe('num_key_value_heads')}"
            )

    def describe(self, name: str) -> str:
        """`name=value` of a config field, saying where the value came from when config.json lacks it."""
        text = f"{name}={getattr(self, name)}"
        why = dict(self.implied).get(name)
        return f"{text} ({why})" if why else text

    @property
    def q_size(self) -> int:
        """Output width of q_proj (and input width of o_proj)."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output width of k_proj and v_proj."""
        return self.num_key_value_heads * self.head_dim

    def linear_shape(self, module: str) -> tuple[int, int]:
        """(out_features, in_features) of a targetable linear by its HF short name."""
        out_width, in_width = LINEAR_WIDTHS[module]
        return getattr(self, out_width), getattr(self, in_width)

    @property
    def trained_positions(self) -> int:
        """How many positions the base serves: max_position_embeddings, stretched by linear or YaRN RoPE scaling."""
        rope = self.rope
        if rope.rope_type in ("linear", "yarn"):
            original = rope.original_max_position_embeddings or self.max_position_embeddings
            return max(self.max_position_embeddings, int(original * rope.factor))
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Validate a config.json dict and normalise it; raise UnsupportedModelError with the reason."""
        archs = raw.get("architectures") or []
        arch = architecture(raw)
        if arch is None:
            if not isinstance(archs, list):
                raise TypeError(
                    f"architectures must be a list of class names, got a {type(archs).__name__} "
                    f"({archs!r:.80})"
                )
            raise UnsupportedModelError(
                f"architecture {archs or raw.get('model_type')!r} is not supported; "
                f"the engine runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        model_type = raw.get("model_type")
        if isinstance(model_type, str) and model_type != arch:
            # vLLM picks the class by architectures too, but transformers' AutoModelForCausalLM
            # builds model_type's, with its defaults (biases, sliding window, KV heads).
            log.warning(
                "config.json's architectures (%s) and model_type (%r) disagree: serving it as "
                "%s, as the architectures list says (and vLLM reads it); transformers builds "
                "model_type's class, whose outputs may differ",
                ", ".join(map(str, archs)) if isinstance(archs, list) else archs,
                model_type,
                arch,
            )
        quantization = raw.get("quantization_config")
        if quantization:
            # Its weights are packed integers or 8-bit floats with scales beside them: read as
            # plain weights they would load and give nonsense.
            method = quantization.get("quant_method") if isinstance(quantization, dict) else None
            raise UnsupportedModelError(
                "quantized checkpoints are not supported (config.json has a quantization_config"
                + (f" of quant_method {str(method)!r:.40}" if method else "")
                + "); serve the unquantized checkpoint (F32, F16 or BF16 weights)"
            )
        act = raw.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # one function under two names
            raise UnsupportedModelError(
                f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) is"
            )
        missing = [k for k in _REQUIRED_FIELDS if raw.get(k) is None]
        if missing:
            raise UnsupportedModelError(f"config.json lacks {', '.join(map(repr, missing))}")
        hidden = _count(raw, "hidden_size")
        heads = _count(raw, "num_attention_heads")
        head_dim, kv_heads, implied = resolved_heads(raw, arch)
        # As transformers builds each architecture: Qwen2 always has q/k/v biases, Llama says
        # so in attention_bias (o_proj too) and mlp_bias, Mistral has none.
        attention_bias = arch == "qwen2" or (arch == "llama" and bool(raw.get("attention_bias")))
        mlp_bias = arch == "llama" and bool(raw.get("mlp_bias"))
        # transformers' defaults when the key is absent: Mistral and Qwen2 slide over 4096
        # positions (Qwen2 only with use_sliding_window); Llama never slides, whatever it says.
        sliding = None if arch == "llama" else raw.get("sliding_window", 4096)
        # transformers refuses a negative count, and builds a model of no layers for 0.
        layers = _count(raw, "num_hidden_layers", minimum=0)
        # Qwen2 slides only with use_sliding_window, in the layers its layer_types names
        # "sliding_attention" or, without that list, from layer max_window_layers on
        # (transformers' default is 28): with no such layer, every layer attends in full.
        if arch == "qwen2":
            types = raw.get("layer_types")
            slides = (
                "sliding_attention" in types
                if isinstance(types, list)
                else int(raw.get("max_window_layers", 28)) < layers
            )
            if not raw.get("use_sliding_window", False) or not slides:
                sliding = None
        positions = raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch]
        eos = raw.get("eos_token_id")
        eos_ids: tuple[int, ...] = (
            ()
            if eos is None
            else tuple(int(e) for e in eos)
            if isinstance(eos, list)
            else (int(eos),)
        )
        return cls(
            arch=arch,
            vocab_size=_count(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_count(raw, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            max_position_embeddings=_count(
                {"max_position_embeddings": positions},
                "max_position_embeddings",
                # A prompt of one token and one token generated: the engine's least max_model_len.
                minimum=2,
            ),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=parse_rope(raw, arch),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            mlp_bias=mlp_bias,
            sliding_window=int(sliding) if sliding else None,
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            implied=tuple(implied),
            stored_dtype=_stored_dtype(raw),
        )


def _count(raw: dict[str, Any], key: str, *, minimum: int = 1) -> int:
    """config.json's integer `key`; a ValueError naming it when it is less than `minimum`."""
    value = int(raw[key])
    if value < minimum:
        wanted = {0: "must not be negative", 1: "must be a positive integer"}.get(
            minimum, f"must be at least {minimum}"
        )
        raise ValueError(f"{key} {wanted}, got {raw[key]!r}")
    return value


def _stored_dtype(raw: dict[str, Any]) -> str | None:
    """config.json's torch_dtype (transformers 5: dtype), "float16" say; None if it names none."""
    value = raw.get("dtype", raw.get("torch_dtype"))
    return value if isinstance(value, str) else None


# Keys a config.json must give (transformers' defaults for them are no model's real values).
_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# Each targetable linear's (out_features, in_features), by the ModelConfig widths that set them.
LINEAR_WIDTHS = {
    "q_proj": ("q_size", "hidden_size"),
    "k_proj": ("kv_size", "hidden_size"),
    "v_proj": ("kv_size", "hidden_size"),
    "o_proj": ("hidden_size", "q_size"),
    "gate_proj": ("intermediate_size", "hidden_size"),
    "up_proj": ("intermediate_size", "hidden_size"),
    "down_proj": ("hidden_size", "intermediate_size"),
}
# transformers' default max_position_embeddings per architecture, for a config without one.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768}
# What each RoPE scaling type needs in rope_scaling (transformers refuses it without them).
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def parse_rope(raw: dict[str, Any], arch: str = "llama") -> RopeConfig:
    """RoPE parameters from either the old keys (`rope_theta`, `rope_scaling`) or transformers 5's `rope_parameters`.

    A config with both is read as transformers 4 and 5 both read it: a non-empty `rope_scaling`
    whole, `rope_parameters` ignored (transformers 4 never reads it, 5 lets `rope_scaling` replace it).
    """
    for key in ("rope_parameters", "rope_scaling"):
        value = raw.get(key)
        if value is not None and not isinstance(value, dict):  # transformers refuses it too
            raise TypeError(
                f"{key} must be a JSON object, got a {type(value).__name__} ({value!r:.80})"
            )
    params: dict[str, Any] = dict(raw.get("rope_parameters") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        # Nested per layer type (e.g. {"full_attention": {...}}): Llama-family models use one kind only.
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds):
            raise UnsupportedModelError(
                f"per-layer RoPE parameters {sorted(params)} are not supported"
            )
        params = dict(kinds[0])
    scaling = raw.get("rope_scaling")
    if not scaling:
        return _rope_from(params, "rope_parameters" if params else "rope_scaling", raw, arch)
    rope = _rope_from(dict(scaling), "rope_scaling", raw, arch)
    if params:
        try:
            ignored: RopeConfig | str = _rope_from(params, "rope_parameters", raw, arch)
        except UnsupportedModelError as err:
            ignored = str(err)
        if ignored != rope:
            log.warning(
                "config.json has both rope_scaling and rope_parameters and they disagree; "
                "using rope_scaling, as transformers does (%s), not rope_parameters (%s)",
                rope,
                ignored,
            )
    return rope


def _rope_from(source: dict[str, Any], key: str, raw: dict[str, Any], arch: str) -> RopeConfig:
    """A RopeConfig from one RoPE dict of config.json (`key` names it in errors), with the top-level keys."""
    rope_type = source.get("rope_type") or source.get("type") or "default"
    lacking = [k for k in _ROPE_REQUIRED.get(rope_type, ()) if source.get(k) is None]
    if lacking:
        raise UnsupportedModelError(
            f"{key} of type {rope_type!r} lacks {', '.join(map(repr, lacking))}"
        )
    # transformers' scaled RoPE rotates head_dim * partial_rotary_factor dims, but the Llama-family
    # attention rotates the whole head, so transformers fails on such a config; with default RoPE
    # it ignores the factor, and so do we.
    for where, value in (
        (key, source.get("partial_rotary_factor")),
        ("config.json's top level", raw.get("partial_rotary_factor")),
    ):
        if rope_type != "default" and value is not None and float(value) != 1.0:
            raise UnsupportedModelError(
                f"partial_rotary_factor={value} (in {where}) with {rope_type!r} RoPE scaling is not "
                "supported: the architecture rotates the whole head"
            )
    # transformers 5 fills the dict's rope_theta from the top-level key only where it has none.
    theta = source.get("rope_theta", raw.get("rope_theta", 10000.0))
    # The top-level key wins over rope_scaling's, as transformers reads them.
    original = raw.get("original_max_position_embeddings") or source.get(
        "original_max_position_embeddings"
    )
    if rope_type in ("llama3", "yarn") and original is None:
        original = raw.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS.get(arch)
    factor = source.get("factor")
    return RopeConfig(
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(source.get("low_freq_factor", 1.0)),
        high_freq_factor=float(source.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original else None,
        attention_factor=source.get("attention_factor"),
        beta_fast=float(source.get("beta_fast") or 32.0),
        beta_slow=float(source.get("beta_slow") or 1.0),
        mscale=source.get("mscale"),
        mscale_all_dim=source.get("mscale_all_dim"),
        truncate=bool(source.get("truncate", True)),
    )


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale, computed as transformers computes them."""
    dim = head_dim
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope.rope_type in ("default", "dynamic"):
        # Dynamic NTK equals default up to max_position_embeddings; the engine caps lengths there.
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type == "llama3":
        assert rope.original_max_position_embeddings is not None
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    assert rope.original_max_position_embeddings is not None
    factor = rope.factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(
                factor, rope.mscale_all_dim
            )
        else:
            attention_factor = get_mscale(factor)

    original = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv, float(attention_factor)


def read_config(directory: Path) -> ModelConfig:
    """Parse `directory/config.json` into a ModelConfig, with generation_config.json's EOS ids too."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} not found; point the engine at a HF checkpoint directory")
    raw = read_json(path)
    try:
        config = ModelConfig.from_dict(raw)
    except (TypeError, ValueError, AttributeError) as err:  # a field of the wrong kind
        raise CheckpointError(f"{path}: {err}") from None
    if config.stored_dtype is None:
        config = dataclasses.replace(config, stored_dtype=_weights_dtype(Path(directory)))
    # Instruct models (Llama 3, Qwen2.5) list their end-of-turn token here, not in config.json.
    extra = generation_eos_ids(Path(directory) / "generation_config.json")
    if extra:
        ids = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = dataclasses.replace(config, eos_token_ids=ids)
    return config


# safetensors' dtype names, as config.json's torch_dtype spells them.
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
# The tensor whose stored dtype stands for the checkpoint's where config.json names none.
_EMBEDDINGS = ("model.embed_tokens.weight", "embed_tokens.weight", "lm_head.weight")


def _weights_dtype(directory: Path) -> str | None:
    """The dtype the embedding is stored in ("float16", say), read from the safetensors headers
    alone, for a config.json without torch_dtype; None where there is none to read (the load
    reports a missing or damaged file)."""
    try:
        headers = [safetensors_header(path) for path in safetensors_files(directory)]
    except CheckpointError:
        return None
    for name in _EMBEDDINGS:
        for header in headers:
            if name in header:
                return _SAFETENSORS_DTYPES.get(header[name]["dtype"])
    return None


def generation_eos_ids(path: Path) -> tuple[int, ...]:
    """The EOS ids generation_config.json lists; what is not a token id there is named in a
    warning and left out, as a file that does not parse is: transformers loads the model
    without them too (config.json's and the tokenizer's EOS ids still end a sequence)."""
    if not path.is_file():
        return ()
    try:
        eos = read_json(path).get("eos_token_id")
    except CheckpointError as err:
        log.warning(
            "%s; ignoring it, as transformers does (config.json's and the tokenizer's EOS ids "
            "still end a sequence)",
            err,
        )
        return ()
    ids: list[int] = []
    for entry in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        try:
            if isinstance(entry, bool) or (isinstance(entry, float) and not entry.is_integer()):
                raise TypeError(entry)  # JSON true is no token id, though Python's int(True) is 1
            ids.append(int(entry))
        except (TypeError, ValueError, OverflowError):
            log.warning("ignoring %s's eos_token_id %r: not a token id", path, entry)
    return tuple(ids)


def _check_readable(path: Path) -> None:
    """A CheckpointError naming `path` when this process may not read it: safetensors and
    tokenizers report a file they were refused as one that does not exist."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(cannot_read(path, err)) from None


def iter_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) over every tensor of the checkpoint, one shard at a time; a shard
    that cannot be read is a CheckpointError naming it."""
    from safetensors import SafetensorError, safe_open

    for path in safetensors_files(directory):
        _check_readable(path)
        with open(path, "rb") as handle:
            lfs = lfs_pointer_error(path, handle.read(64))
        if lfs is not None:
            raise lfs
        try:
            with safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as err:  # a header or data that does not parse
            raise CheckpointError(f"{path} is not a readable safetensors file: {err}") from None


def read_special_tokens(directory: Path, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The special tokens (`bos_token`, `eos_token`, ...) as transformers 5 reads them:
    tokenizer_config.json's (or `config`, already read from it), with special_tokens_map.json's
    over them when the config has no added_tokens_decoder (an older save); it ignores that file
    otherwise. Values are strings or AddedToken dicts ({"content": ...})."""
    if config is None:
        path = Path(directory) / "tokenizer_config.json"
        try:
            config = read_json(path) if path.is_file() else {}
        except CheckpointError as err:
            log.warning("ignoring %s", err)
            config = {}
    tokens = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str | dict)}
    special = Path(directory) / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and special.is_file():
        try:
            mapped = read_json(special)
        except CheckpointError as err:
            log.warning("ignoring %s", err)
            mapped = {}
        tokens.update(
            {k: v for k, v in mapped.items() if k.endswith("_token") and isinstance(v, str | dict)}
        )
    return tokens


def token_text(value: Any) -> str | None:
    """A special token's text, from its string or AddedToken dict form."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# A slow (Python) tokenizer's files, as transformers saves them: the `tokenizers` library reads
# none of them, only the tokenizer.json that transformers writes from them.
SLOW_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt")


def missing_tokenizer_hint(directory: Path) -> str:
    """Why `directory` has no tokenizer this engine reads and how to write one: the slow
    tokenizer's files it has, if any (empty when it has none of them)."""
    found = [name for name in SLOW_TOKENIZER_FILES if (Path(directory) / name).is_file()]
    if not found:
        return ""
    needs = " (with the sentencepiece package)" if "tokenizer.model" in found else ""
    return (
        f" (it has {' and '.join(found)}, a slow tokenizer's files, which this server does not "
        f"read: write tokenizer.json beside them with transformers{needs}, "
        f"AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))"
    )


def load_tokenizer(directory: Path) -> Any:
    """The `tokenizers.Tokenizer` of `directory/tokenizer.json`, or None when the checkpoint has none."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    _check_readable(path)
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for a file it cannot parse
        raise CheckpointError(f"{path} is not a tokenizer this engine reads: {err}") from None
