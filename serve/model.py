"""Our forward for Llama, Mistral and Qwen2: flat token batches, a slot KV cache, LoRA via add_lora."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mintvcs.kernels import Backend
from mintvcs.kernels.torch_ops import packed_step
from mintvcs.progress import Progress
from mintvcs.serve.kv_cache import KVCache
from mintvcs.serve.loader import (
    LINEAR_WIDTHS,
    CheckpointError,
    ModelConfig,
    UnsupportedModelError,
    iter_tensors,
    read_config,
    rope_inv_freq,
)

log = logging.getLogger("mintvcs.serve")

# The linears a LoRA may target, in the order the forward applies them.
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The fused linears of a layer (one base matmul each) and the modules whose columns they hold, in order.
LORA_GROUPS = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
# What a PeftModel's state dict puts before the wrapped model's own tensor names.
_PEFT_PREFIX = "base_model.model."
# The weight dtypes a checkpoint may hold; anything else is quantized.
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused so that the base does one matmul each."""

    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [q + 2*kv, hidden]
    qkv_bias: torch.Tensor | None  # [q + 2*kv]
    o: torch.Tensor  # [hidden, q]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2*inter, hidden]
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, inter]
    down_bias: torch.Tensor | None
    o_bias: torch.Tensor | None = None


@dataclass
class StepBatch:
    """One iteration's tokens, flattened: the decode tokens first (one per sequence), then the prefills."""

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long
    token_kv_slots: torch.Tensor  # [T] long
    token_lora_slots: torch.Tensor  # [T] int32, -1 = base only
    num_decode: int
    decode_kv_slots: torch.Tensor  # [D] long
    # [D, 1, 1, Lmax] bool, True = attend; with decode_span, [span, 1, 1, Lmax] over its KV slots
    decode_mask: torch.Tensor | None
    max_decode_len: int
    # (start row, length, kv_slot, first position): a prompt, or a chunk of one from `offset` on
    prefills: list[tuple[int, int, int, int]]
    # [R] the token rows whose logits forward() returns: each sequence's last token, and every
    # token of a scored prefill (prompt logprobs)
    logits_index: torch.Tensor
    # (first, end) KV slots the decodes' attention reads as one view instead of gathering them;
    # None = gather decode_kv_slots. decode_rows: each decode's row in that span (None = in order).
    decode_span: tuple[int, int] | None = None
    decode_rows: torch.Tensor | None = None
    # Each sampled sequence's last-token row within forward()'s output; None = row i is
    # sequence i (no prefill scored, none mid-prompt).
    seq_rows: list[int] | None = None
    # Prefill index -> its first row within forward()'s output, for the scored prefills.
    scored_rows: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        decodes: Sequence[tuple[int, int, int, int]],
        prefills: Sequence[tuple[Sequence[int], int, int]],
        device: torch.device,
        *,
        scored: Collection[int] = (),
        starts: Sequence[int] = (),
        unsampled: Collection[int] = (),
    ) -> StepBatch:
        """Flatten decodes (token, position, kv_slot, lora_slot) and prefills (tokens, kv_slot, lora_slot).

        By index into `prefills`: `scored` ones want every token's logits, not only the last;
        `starts` gives each one's first position (a later chunk of a prompt; default 0), and
        `unsampled` ones end mid-prompt, so their last token has no logits row to sample from.
        """
        ids: list[int] = []
        pos: list[int] = []
        kv: list[int] = []
        lora: list[int] = []
        last: list[int] = []
        rows: list[int] = []  # logits rows, when a prefill is scored
        for token, position, kv_slot, lora_slot in decodes:
            last.append(len(ids))
            ids.append(token)
            pos.append(position)
            kv.append(kv_slot)
            lora.append(lora_slot)
        spans: list[tuple[int, int, int, int]] = []
        listed = bool(scored or unsampled)  # output rows differ from one per sequence
        seq_rows: list[int] | None = list(range(len(decodes))) if listed else None
        scored_rows: dict[int, int] = {}
        if listed:
            rows.extend(last)
        for i, (tokens, kv_slot, lora_slot) in enumerate(prefills):
            start = len(ids)
            n = len(tokens)
            offset = starts[i] if starts else 0
            ids.extend(tokens)
            pos.extend(range(offset, offset + n))
            kv.extend([kv_slot] * n)
            lora.extend([lora_slot] * n)
            spans.append((start, n, kv_slot, offset))
            last.append(start + n - 1)
            if seq_rows is not None:
                if i in scored:
                    scored_rows[i] = len(rows)
                    rows.extend(range(start, start + n))
                elif i not in unsampled:
                    rows.append(start + n - 1)
                if i not in unsampled:
                    seq_rows.append(len(rows) - 1)
        num_decode = len(decodes)
        lengths = [p + 1 for p in pos[:num_decode]]
        max_len = max(lengths, default=0)
        mask = None
        span: tuple[int, int] | None = None
        decode_rows = None
        if num_decode:
            kv_slots = kv[:num_decode]
            first, end = min(kv_slots), max(kv_slots) + 1
            # Gathering the decodes' keys and values copies the whole cache prefix every layer;
            # a view over the KV slots they span copies nothing. Slots in the span that no decode
            # uses (holes) cost attention work, so only take the view while they are few.
            if end - first <= 2 * num_decode and len(set(kv_slots)) == num_decode:
                span = (first, end)
                row_lengths = [1] * (end - first)  # holes attend to position 0 only: no NaN rows
                for slot, n in zip(kv_slots, lengths, strict=True):
                    row_lengths[slot - first] = n
                if kv_slots != list(range(first, end)):
                    decode_rows = torch.tensor(
                        [s - first for s in kv_slots], dtype=torch.long, device=device
                    )
                lengths = row_lengths
            mask = (torch.arange(max_len).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).view(
                len(lengths), 1, 1, max_len
            )
            mask = mask.to(device)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(pos, dtype=torch.long, device=device),
            token_kv_slots=torch.tensor(kv, dtype=torch.long, device=device),
            token_lora_slots=torch.tensor(lora, dtype=torch.int32, device=device),
            num_decode=num_decode,
            decode_kv_slots=torch.tensor(kv[:num_decode], dtype=torch.long, device=device),
            decode_mask=mask,
            max_decode_len=max_len,
            prefills=spans,
            logits_index=torch.tensor(rows if listed else last, dtype=torch.long, device=device),
            decode_span=span,
            decode_rows=decode_rows,
            seq_rows=seq_rows,
            scored_rows=scored_rows,
        )


@dataclass
class LoraBatch:
    """The adapter pools and each token's slot for one step; modules = what any slot in the batch targets."""

    token_slots: Any  # kernels.SlotGroups built once per step (or a [T] int32 tensor)
    a: list[dict[str, torch.Tensor]]  # per layer, module -> [slots, max_rank, in]
    b: list[dict[str, torch.Tensor]]  # per layer, module -> [slots, out, max_rank]
    scales: torch.Tensor  # [slots] float32
    ranks: torch.Tensor | None = None  # [slots] int32 real rank per slot
    modules: frozenset[str] = field(default_factory=frozenset)
    backend: Backend = "auto"
    # per layer, group name (LORA_GROUPS) -> kernels PackedLora; used instead of a/b when present
    packed: list[dict[str, Any]] | None = None


def _apply_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora: LoraBatch,
    layer: int,
    group: tuple[tuple[str, int], ...],
    name: str,
) -> None:
    """Add the multi-LoRA update of a fused group of linears (name, width) to y's column blocks."""
    if not any(module in lora.modules for module, _ in group):
        return
    if lora.packed is not None:
        packed = lora.packed[layer].get(name)
        if packed is not None:
            # The same sum as below with the slices' factors side by side: 2 matmuls per call.
            # The step's plan is built by the first layer and cached on its SlotGroups.
            packed_step(lora.token_slots, lora.scales, lora.ranks).apply(y, x, packed)
            return
    from mintvcs import kernels

    pools_a, pools_b = lora.a[layer], lora.b[layer]
    if all(module in pools_a for module, _ in group):
        # One call for the whole fused projection; slots that skip a module hold zeros there.
        slices = [(pools_a[m], pools_b[m]) for m, _ in group]
        kernels.add_lora_slices(
            y,
            x,
            slices,
            lora.token_slots,
            lora.scales,
            slot_ranks=lora.ranks,
            backend=lora.backend,
            validate=False,  # the engine built the pools and grouped the step's tokens
        )
        return
    col = 0
    for module, width in group:
        if module in pools_a and module in lora.modules:
            kernels.add_lora(
                y[:, col : col + width],
                x,
                pools_a[module],
                pools_b[module],
                lora.token_slots,
                lora.scales,
                slot_ranks=lora.ranks,
                backend=lora.backend,
                validate=False,
            )
        col += width


# oneDNN's blocked weight layout for small-batch GEMMs; F.linear re-packs the weight on every call,
# which is about half of a 32-token decode step on a CPU (docs/engine.md). The hint is the batch
# size the layout is tuned for: decode batches are tens of tokens.
_PACK_BATCH_HINT = 32


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's packed layout where oneDNN runs it (CPU, fp32), else the weight itself."""
    if (
        weight.device.type != "cpu"
        or weight.dtype != torch.float32
        or not torch.backends.mkldnn.is_available()
    ):
        return weight
    try:
        packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_BATCH_HINT)
    except (AttributeError, RuntimeError):  # a torch build without the op: plain F.linear
        return weight
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, for a plain weight or one from prepack_weight."""
    if weight.is_mkldnn:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return out
    return F.linear(x, weight, bias)


def check_max_len(config: ModelConfig, max_len: int) -> None:
    """UnsupportedModelError where the model cannot serve `max_len` positions as configured."""
    if config.sliding_window and max_len > config.sliding_window:
        raise UnsupportedModelError(
            "sliding-window attention is not implemented; set max_model_len (--max-model-len) "
            f"<= {config.sliding_window}"
        )
    if config.rope.rope_type == "dynamic" and max_len > config.max_position_embeddings:
        raise UnsupportedModelError(
            "dynamic NTK RoPE changes beyond max_position_embeddings; "
            f"set max_model_len (--max-model-len) <= {config.max_position_embeddings}"
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        # torch's fused kernel: the same fp32 arithmetic in one op instead of five.
        return F.rms_norm(x, weight.shape, weight, eps)
    # Variance in fp32, as transformers does, so bf16 runs round the same way.
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    # x * cos + rotate_half(x) * sin, where rotate_half(x) = cat(-x2, x1): the sign lives in
    # sin_signed (its first half negated), which rounds identically since negation is exact.
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


def _decode_attention_cpu(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """One query per sequence: q [D, heads, hd] over keys/values [D, kv_heads, L, hd] -> [D, heads, hd]."""
    # Two batched matmuls with each KV head's query group stacked as rows: on CPU this beats
    # SDPA's flash kernel, which tiles for long queries, by about a third at decode shapes.
    d, heads, hd = q.shape
    kv_heads = keys.shape[1]
    qg = (q * hd**-0.5).view(d, kv_heads, heads // kv_heads, hd)
    scores = torch.matmul(qg, keys.transpose(-1, -2))  # [D, kv_heads, group, L]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values).view(d, heads, hd)


class Model:
    """A Llama-family decoder with weights in one dtype on one device."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[LayerWeights],
        norm: torch.Tensor,
        lm_head: torch.Tensor,
        *,
        max_len: int | None = None,
        prepack: bool = True,
    ) -> None:
        self.config = config
        self.embed = embed
        self.tied_embeddings = lm_head is embed
        if prepack:
            for layer in layers:
                for name in ("qkv", "o", "gate_up", "down"):
                    setattr(layer, name, prepack_weight(getattr(layer, name)))
            lm_head = prepack_weight(lm_head)  # a tied head becomes its own packed copy
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.dtype = embed.dtype
        self.device = embed.device
        self.max_len = max_len or config.max_position_embeddings
        check_max_len(config, self.max_len)
        inv_freq, scale = rope_inv_freq(config.rope, config.head_dim)
        positions = torch.arange(self.max_len, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        # [max_len, head_dim], in the model dtype as transformers casts them.
        self.cos = (emb.cos() * scale).to(dtype=self.dtype, device=self.device)
        sin = (emb.sin() * scale).to(dtype=self.dtype, device=self.device)
        half = config.head_dim // 2
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    @classmethod
    def from_dir(
        cls,
        directory: Path | str,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        max_len: int | None = None,
        prepack: bool = True,
        progress: Progress | None = None,
        config: ModelConfig | None = None,
    ) -> Model:
        """Load a HF checkpoint directory (config.json + safetensors, sharded or not).

        `progress` is called with each tensor's stored bytes once it is read; `config` is the
        directory's read_config(), where the caller has read it already.
        """
        directory = Path(directory)
        config = config or read_config(directory)
        device = torch.device(device)
        raw: dict[str, torch.Tensor] = {}
        not_finite: list[str] = []
        for name, tensor in iter_tensors(directory):
            if progress is not None:
                progress(tensor.numel() * tensor.element_size())
            if name.endswith("rotary_emb.inv_freq"):
                continue
            # Other dtypes stay as stored: from_state_dict refuses one it would use.
            if tensor.dtype in _FLOATS:
                stored, tensor = tensor, tensor.to(device=device, dtype=dtype)
                if not bool(torch.isfinite(tensor).all()):
                    # Finite as stored: values past the range of the dtype it is served in.
                    cast = bool(torch.isfinite(stored).all())
                    served = str(dtype).removeprefix("torch.")
                    not_finite.append(
                        f"{name!r:.80}" + (f" (past the range of {served})" if cast else "")
                    )
                del stored
            raw[name] = tensor
        if not_finite:
            # transformers loads such weights without a word too, but every output is then
            # decided by NaN (token 0, say): a bad conversion or a damaged download, most likely.
            log.warning(
                "the checkpoint has NaN or infinite values in %d tensor(s): %s; outputs will be "
                "nonsense wherever they are used (check the conversion or download it again)",
                len(not_finite),
                ", ".join(not_finite[:5]) + (", ..." if not_finite[5:] else ""),
            )
        return cls.from_state_dict(config, raw, max_len=max_len, prepack=prepack)

    @classmethod
    def from_state_dict(
        cls,
        config: ModelConfig,
        raw: dict[str, torch.Tensor],
        *,
        max_len: int | None = None,
        prepack: bool = True,
    ) -> Model:
        """Build from HF-named tensors already in the target dtype and device; consumes `raw`.

        Each tensor must have the shape config.json gives it (transformers refuses a mismatch
        too); a CheckpointError names the tensor, both shapes and the fields behind them.
        """
        c = config
        # Each width a tensor may have, with the config fields that set it.
        widths = {
            "hidden_size": (c.hidden_size, c.describe("hidden_size")),
            "q_size": (c.q_size, f"{c.describe('num_attention_heads')} * {c.describe('head_dim')}"),
            "kv_size": (
                c.kv_size,
                f"{c.describe('num_key_value_heads')} * {c.describe('head_dim')}",
            ),
            "intermediate_size": (c.intermediate_size, c.describe("intermediate_size")),
        }
        hidden = widths["hidden_size"]
        vocab = (c.vocab_size, c.describe("vocab_size"))

        def check(name: str, tensor: torch.Tensor, *dims: tuple[int, str]) -> torch.Tensor:
            if tensor.dtype not in _FLOATS:
                # 8-bit floats or packed integers: quantized weights, whose scales sit apart.
                raise CheckpointError(
                    f"tensor {name!r} is stored as {str(tensor.dtype).removeprefix('torch.')}: "
                    "quantized weights are not supported; serve the unquantized checkpoint "
                    "(F32, F16 or BF16 weights)"
                )
            want = [size for size, _ in dims]
            if list(tensor.shape) != want:
                fields = ", ".join(dict.fromkeys(why for _, why in dims))
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(tensor.shape)} in the checkpoint, but "
                    f"config.json makes it {want} ({fields})"
                )
            return tensor

        def pop(name: str) -> torch.Tensor | None:
            # transformers 5 adds its base-model prefix name by name: a tensor saved from the
            # bare decoder (LlamaModel) as `layers.0.…` is `model.layers.0.…`, beside prefixed
            # names too. Of both spellings it keeps one by sort order, so we refuse the pair.
            bare = name.removeprefix("model.")
            if bare == name or bare not in raw:
                return raw.pop(name, None)
            if name in raw:
                raise CheckpointError(
                    f"the checkpoint holds both {name!r} and {bare!r}, which transformers "
                    "reads as one tensor (adding the 'model.' prefix); keep one of them"
                )
            return raw.pop(bare)

        def take(name: str, *dims: tuple[int, str]) -> torch.Tensor:
            tensor = pop(name)
            if tensor is None:
                why = ""
                if any(other.startswith(_PEFT_PREFIX) for other in raw):
                    # transformers loads none of these names either: it leaves every weight
                    # at its random initialisation.
                    why = (
                        f": its tensor names start with {_PEFT_PREFIX!r}, as a PEFT model "
                        "names them; save the base model itself (PEFT's merge_and_unload() "
                        "returns it, any LoRA merged in) with save_pretrained and serve that"
                    )
                raise CheckpointError(f"tensor {name!r} missing from the checkpoint{why}")
            return check(name, tensor, *dims)

        def maybe(name: str, *dims: tuple[int, str]) -> torch.Tensor | None:
            tensor = pop(name)
            return None if tensor is None else check(name, tensor, *dims)

        shapes = {
            module: (widths[out_width], widths[in_width])
            for module, (out_width, in_width) in LINEAR_WIDTHS.items()
        }
        layers = []
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}"
            attn, mlp = f"{p}.self_attn", f"{p}.mlp"

            def weight(group: str, module: str) -> torch.Tensor:
                return take(f"{group}.{module}.weight", *shapes[module])

            def bias(group: str, module: str) -> torch.Tensor:
                return take(f"{group}.{module}.bias", shapes[module][0])

            q, k, v = (weight(attn, m) for m in ("q_proj", "k_proj", "v_proj"))
            # Biases as the config asks for them, as transformers builds the layers: one it asks
            # for must be there, one it does not is ignored (a stray tensor changes nothing).
            qkv_bias = o_bias = gate_up_bias = down_bias = None
            if config.attention_bias:
                qkv_bias = torch.cat([bias(attn, m) for m in ("q_proj", "k_proj", "v_proj")])
                if config.arch != "qwen2":  # Qwen2's o_proj has none
                    o_bias = bias(attn, "o_proj")
            if config.mlp_bias:
                gate_up_bias = torch.cat([bias(mlp, "gate_proj"), bias(mlp, "up_proj")])
                down_bias = bias(mlp, "down_proj")
            layers.append(
                LayerWeights(
                    input_norm=take(f"{p}.input_layernorm.weight", hidden),
                    qkv=torch.cat([q, k, v]),
                    qkv_bias=qkv_bias,
                    o=weight(attn, "o_proj"),
                    o_bias=o_bias,
                    post_norm=take(f"{p}.post_attention_layernorm.weight", hidden),
                    gate_up=torch.cat([weight(mlp, "gate_proj"), weight(mlp, "up_proj")]),
                    gate_up_bias=gate_up_bias,
                    down=weight(mlp, "down_proj"),
                    down_bias=down_bias,
                )
            )
            del q, k, v
        embed = maybe("model.embed_tokens.weight", vocab, hidden)
        lm_head = maybe("lm_head.weight", vocab, hidden)
        if embed is None:
            if lm_head is None or not config.tie_word_embeddings:
                found = " (there is an lm_head.weight, but tie_word_embeddings is false)"
                raise CheckpointError(
                    "tensor 'model.embed_tokens.weight' missing from the checkpoint"
                    + (found if lm_head is not None else "")
                )
            # A tied checkpoint may keep the shared matrix under the head's name only
            # (safetensors' save_model does): transformers ties the embedding to it.
            embed = lm_head
        if lm_head is None:
            if not config.tie_word_embeddings:
                raise CheckpointError("lm_head.weight missing and tie_word_embeddings is false")
            lm_head = embed
        elif config.tie_word_embeddings and lm_head is not embed:
            if torch.equal(lm_head, embed):
                lm_head = embed
            else:
                # As transformers (our logits' oracle) does: a stored head that differs from
                # the embedding was trained apart from it, so tying would change the model.
                log.warning(
                    "tie_word_embeddings is true but the checkpoint's lm_head.weight differs "
                    "from its embedding; using the stored lm_head (set tie_word_embeddings to "
                    "false to silence this)"
                )
        norm = take("model.norm.weight", hidden)
        if raw:
            # As transformers does, a warning: such a tensor belongs to a part neither runs.
            unused = sorted(raw)
            log.warning(
                "the checkpoint holds %d tensor(s) the model does not use: %s",
                len(unused),
                ", ".join(f"{name!r:.80}" for name in unused[:5]) + (", ..." if unused[5:] else ""),
            )
        return cls(config, embed, layers, norm, lm_head, max_len=max_len, prepack=prepack)

    @property
    def num_parameters(self) -> int:
        """Parameter count, counting tied embeddings once."""
        tensors: list[torch.Tensor] = [self.embed, self.norm]
        if not self.tied_embeddings:
            tensors.append(self.lm_head)
        for layer in self.layers:
            tensors.extend(t for t in vars(layer).values() if isinstance(t, torch.Tensor))
        return sum(t.numel() for t in tensors)

    def new_kv_cache(
        self, num_slots: int, max_len: int | None = None, *, scratch: bool = False
    ) -> KVCache:
        """A KV cache with `num_slots` sequences of up to `max_len` positions (and a scratch slot)."""
        c = self.config
        return KVCache(
            c.num_hidden_layers,
            num_slots,
            max_len or self.max_len,
            c.num_key_value_heads,
            c.head_dim,
            dtype=self.dtype,
            device=self.device,
            scratch=scratch,
        )

    @torch.inference_mode()
    def forward(
        self,
        batch: StepBatch,
        kv: KVCache,
        lora: LoraBatch | None = None,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run one step; return fp32 logits of batch.logits_index's rows [R, vocab] (or [T, vocab] with all_logits)."""
        return self.head(self.hidden(batch, kv, lora, all_rows=all_logits))

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, vocab] of final hidden states [R, hidden] (from hidden())."""
        return linear(hidden, self.lm_head).float()

    @torch.inference_mode()
    def hidden(
        self,
        batch: StepBatch,
        kv: KVCache,
        lora: LoraBatch | None = None,
        *,
        all_rows: bool = False,
    ) -> torch.Tensor:
        """Run one step; return the final-normed hidden states of batch.logits_index's rows (or all)."""
        c = self.config
        n_tokens = batch.input_ids.shape[0]
        qs, kvs = c.q_size, c.kv_size
        hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
        cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, head_dim]
        sin = self.sin_signed[batch.positions].unsqueeze(1)
        if lora is not None and not lora.modules:
            lora = None
        inter = c.intermediate_size
        qkv_group = (("q_proj", qs), ("k_proj", kvs), ("v_proj", kvs))
        o_group = (("o_proj", c.hidden_size),)
        gate_up_group = (("gate_proj", inter), ("up_proj", inter))
        down_group = (("down_proj", c.hidden_size),)
        h = self.embed[batch.input_ids]  # [T, hidden]
        for i, layer in enumerate(self.layers):
            x = _rms_norm(h, layer.input_norm, c.rms_norm_eps)
            qkv = linear(x, layer.qkv, layer.qkv_bias)  # [T, q + 2kv]
            if lora is not None:
                _apply_lora(qkv, x, lora, i, qkv_group, "qkv")
            # RoPE on q and k heads together: one set of elementwise ops instead of two.
            qk = _rope(qkv[:, : qs + kvs].view(n_tokens, nh + nkv, hd), cos, sin)
            q = qk[:, :nh]
            k = qk[:, nh:]
            v = qkv[:, qs + kvs :].view(n_tokens, nkv, hd)
            kv.write(i, batch.token_kv_slots, batch.positions, k, v)
            attn = self._attention(i, q, k, v, batch, kv)  # [T, q]
            o = linear(attn, layer.o, layer.o_bias)
            if lora is not None:
                _apply_lora(o, attn, lora, i, o_group, "o")
            h.add_(o)  # h is this forward's own tensor (the embedding lookup made it)
            x = _rms_norm(h, layer.post_norm, c.rms_norm_eps)
            gate_up = linear(x, layer.gate_up, layer.gate_up_bias)  # [T, 2*inter]
            if lora is not None:
                _apply_lora(gate_up, x, lora, i, gate_up_group, "gate_up")
            act = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
            down = linear(act, layer.down, layer.down_bias)
            if lora is not None:
                _apply_lora(down, act, lora, i, down_group, "down")
            h.add_(down)
        if not all_rows:
            h = h[batch.logits_index]
        return _rms_norm(h, self.norm, c.rms_norm_eps)

    def _attention(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        batch: StepBatch,
        kv: KVCache,
    ) -> torch.Tensor:
        """Causal attention per sequence: decodes read the cache together, prefills attend to themselves."""
        c = self.config
        out = q.new_empty(q.shape)  # [T, heads, head_dim], contiguous even though q is a view
        gqa = c.num_attention_heads != c.num_key_value_heads
        nd = batch.num_decode
        if nd:
            span = batch.decode_span
            if span is None:
                keys, values = kv.gather(
                    layer, batch.decode_kv_slots, batch.max_decode_len
                )  # [D, kvh, L, hd]
            else:  # views: [span, kvh, L, hd]
                keys = kv.keys[layer][span[0] : span[1], :, : batch.max_decode_len]
                values = kv.values[layer][span[0] : span[1], :, : batch.max_decode_len]
            qd = q[:nd]  # [D, heads, hd]
            rows = batch.decode_rows
            if rows is not None:  # place each decode's query at its KV slot's row of the span
                qd = q.new_zeros(keys.shape[0], q.shape[1], q.shape[2]).index_copy_(0, rows, qd)
            if q.device.type == "cpu" and q.dtype == torch.float32:
                od = _decode_attention_cpu(qd, keys, values, batch.decode_mask)
            else:
                # Each KV head's query group as that head's query rows: equal head counts, so the
                # fused kernels take it (with enable_gqa and a mask, torch falls back to its math
                # backend, which upcasts and repeats K and V to every query head).
                d, heads, hd = qd.shape
                nkv = keys.shape[1]
                od = F.scaled_dot_product_attention(
                    qd.reshape(d, nkv, heads // nkv, hd), keys, values, attn_mask=batch.decode_mask
                ).reshape(d, heads, hd)
            out[:nd] = od if rows is None else od.index_select(0, rows)
        for start, length, slot, offset in batch.prefills:
            qp = q[start : start + length].transpose(0, 1).unsqueeze(0)  # [1, heads, n, hd]
            if offset == 0:  # a whole prompt, or its first chunk: its own tokens, causally
                kp = k[start : start + length].transpose(0, 1).unsqueeze(0)
                vp = v[start : start + length].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
            else:  # a later chunk: the prompt so far from the cache (this chunk written already)
                end = offset + length
                kp = kv.keys[layer][slot : slot + 1, :, :end]  # [1, kvh, end, hd]
                vp = kv.values[layer][slot : slot + 1, :, :end]
                seen = torch.arange(end, device=q.device).unsqueeze(0)
                mask = seen <= torch.arange(offset, end, device=q.device).unsqueeze(1)  # [n, end]
                # Each KV head's query heads as its rows, as for decodes: with equal head counts
                # and a mask, the fused kernels take it (with enable_gqa, torch falls back to its
                # math backend, which materialises the scores in fp32).
                nkv, hd = kp.shape[1], kp.shape[3]
                group = qp.shape[1] // nkv
                qg = qp.reshape(1, nkv, group * length, hd)
                og = F.scaled_dot_product_attention(qg, kp, vp, attn_mask=mask.repeat(group, 1))
                op = og.reshape(1, qp.shape[1], length, hd)
            out[start : start + length] = op.squeeze(0).transpose(0, 1)
        return out.view(q.shape[0], -1)
