"""Multi-LoRA kernels: add each token's own adapter update to a linear layer's output.

    add_lora(y, x, lora_a, lora_b, token_slots, scales, *, slot_ranks=None, backend="auto") -> y
      y [T, N] += scales[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T, s = token_slots[t], in place
      x [T, K]; lora_a [S, R, K]; lora_b [S, N, R]; token_slots [T] int32 (-1 = no adapter);
      scales [S] float32 (float16/bfloat16 accepted, read as float32);
      slot_ranks [S] int32 real ranks (None = R for all; rank 0 = untouched, like -1)

Per decode step, build `groups = group_tokens(token_slots, S)` once and pass it as
token_slots to every layer (validate=False: no sync, and every index outside 0..S-1 is idle). For fused projections (q/k/v, gate/up) call
`add_lora_slices(y, x, [(a_q, b_q), (a_k, b_k), (a_v, b_v)], groups, scales)`: one launch,
slice i writes the columns of y that follow slices 0..i-1. On CPU the engine keeps each fused
layer's factors packed (`new_packed`, `pack_slot`, `add_lora_packed`): one shrink matmul per
layer. See docs/kernels.md.
"""

from .checks import LoraShapeError
from .groups import SlotGroups, group_tokens
from .ops import (
    Backend,
    LoraBackendError,
    PackedLora,
    add_lora,
    add_lora_packed,
    add_lora_slices,
    new_packed,
    pack_slot,
    resolve_backend,
)
from .reference import add_lora_reference

__all__ = [
    "Backend",
    "LoraBackendError",
    "LoraShapeError",
    "PackedLora",
    "SlotGroups",
    "add_lora",
    "add_lora_packed",
    "add_lora_reference",
    "add_lora_slices",
    "group_tokens",
    "new_packed",
    "pack_slot",
    "resolve_backend",
]
