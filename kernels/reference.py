"""The specification of add_lora in plain torch: one token at a time, in float64. Slow on purpose."""

from __future__ import annotations

import torch


def add_lora_reference(
    y: torch.Tensor,  # [tokens, out]
    x: torch.Tensor,  # [tokens, in]
    lora_a: torch.Tensor,  # [slots, rank, in]
    lora_b: torch.Tensor,  # [slots, out, rank]
    token_slots: torch.Tensor,  # [tokens] int, -1 = no adapter
    scales: torch.Tensor,  # [slots]
    slot_ranks: torch.Tensor | None = None,  # [slots] real ranks; None = all of rank
) -> torch.Tensor:
    """y[t] += scales[s] * (x[t] @ lora_a[s, :r].T) @ lora_b[s, :, :r].T with s = token_slots[t]."""
    rank = lora_a.shape[1]
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s < 0:
            continue  # no adapter: y[t] is not touched at all
        r = rank if slot_ranks is None else int(slot_ranks[s])
        if r == 0:
            continue
        a = lora_a[s, :r].double()  # [r, in]; rows past the real rank are never read
        b = lora_b[s, :, :r].double()  # [out, r]
        h = x[t].double() @ a.T  # [r]
        delta = float(scales[s]) * (h @ b.T)  # [out]
        y[t] = (y[t].double() + delta).to(y.dtype)
    return y
