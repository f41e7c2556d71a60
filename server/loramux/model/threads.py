"""Which threads run torch's parallel work: one OpenMP team in the process, the engine's.

libgomp keeps a team of worker threads for every thread that starts a parallel region,
and once the process holds more OpenMP threads than CPUs it stops spin-waiting between
regions: each of the hundreds of regions of a decode step then puts its threads to sleep
and wakes them through the kernel (costly in a VM). A model loaded on the main thread and
run on the engine thread is two teams; on 2 cores a 32-row SmolLM2 decode step took 199 ms
instead of 127 ms, with 4,700 sleeps per step. So loading and calibrating run on a thread
of their own that ends before the engine starts (its team ends with it), the engine thread
keeps the one team, and every other thread that may touch a tensor (registration, adapter
prefetch, the folder watcher, grammar masks) runs torch on one thread: `single_threaded`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")

# torch's own default (OMP_NUM_THREADS, else the usable cores), read before anything here
# changes it: a thread that has not set its count takes the last count set on any thread.
DEFAULT_THREADS = torch.get_num_threads()


def set_threads(threads: int) -> None:
    """This thread's torch team size (0: torch's default)."""
    # A thread's first parallel op takes the count last set on *any* thread unless the
    # thread has read its own first: read, then set, so that a later change elsewhere
    # (another thread going single-threaded) cannot change this one's.
    torch.get_num_threads()
    torch.set_num_threads(threads or DEFAULT_THREADS)


def single_threaded() -> None:
    """Torch on the calling thread only: it never starts an OpenMP team of its own."""
    set_threads(1)


def apart(fn: Callable[[], T], threads: int, name: str = "loramux-load") -> T:
    """`fn()` run on a new thread with `threads` torch threads (0: torch's default), which
    ends with it (leaving the pool joins its thread); its result, or its exception raised here."""
    with ThreadPoolExecutor(1, thread_name_prefix=name, initializer=set_threads, initargs=(threads,)) as pool:
        return pool.submit(fn).result()
