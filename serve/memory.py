"""Freed memory stays in an engine process on CPU, for the next step to reuse.

glibc's malloc maps blocks over its mmap threshold fresh from the kernel and hands the top of
its heap back once more than its trim threshold lies free there. A decode step frees and then
allocates the same megabytes every step (logits, sampling weights, activations), so with the
defaults steps faulted pages in anew (150-1,900 page faults per decode step with a 32k vocabulary
and sampling, at a few microseconds each on a VM; ~19,000 for one sampling call over 32 rows of
a 128k vocabulary). Raising both thresholds makes a step reuse the pages of the step before.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap: the most glibc accepts on 64-bit (half its
# 64 MiB per-thread heap), above a 128k vocabulary's [32, vocab] float64 cumulative sum.
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of a heap is given back only past this: room for a step's transients
# (a long prefill's activations included) without keeping every byte the process ever freed.
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Set malloc's thresholds so that freed step memory is reused; False where malloc is not glibc's."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; a fixed mmap threshold also stops glibc adjusting it.
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("malloc kept its own thresholds (mallopt refused them)")
    return done
