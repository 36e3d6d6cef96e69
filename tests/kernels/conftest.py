"""Run the Triton kernels in Triton's CPU interpreter when there is no GPU."""

from __future__ import annotations

import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so this must run before
# mintvcs.kernels.triton_ops is imported. With a GPU the compiled kernels run instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
