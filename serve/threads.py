"""One thread computes: every other thread of an engine process runs torch on one intra-op thread.

torch's CPU ops run on an OpenMP team owned by the thread that calls them. GNU OpenMP counts the
threads of all teams, and once they outnumber the CPUs it stops spin-waiting between parallel
regions, so each op puts its workers to sleep and wakes them again: a 32-token decode step on two
cores measured 35% slower when the thread that loaded the model had left a team behind. So the
engine's step thread alone gets a team; loading and background adapter work use one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_intraop_thread() -> Iterator[None]:
    """Run the block's torch ops on the calling thread alone; the thread's setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def use_one_intraop_thread() -> None:
    """A worker thread's initializer: this thread's torch ops never start an OpenMP team."""
    set_intraop_threads(1)


def set_intraop_threads(count: int) -> None:
    """Set the calling thread's torch thread count, so that it sticks."""
    # torch sets a thread's count from a process-wide value on the thread's first torch call,
    # which would override a count set before it: make that first call here.
    torch.get_num_threads()
    torch.set_num_threads(count)
