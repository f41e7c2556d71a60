"""CPU cores lent by the prefill thread to the decode thread while no prompt is prefilled.

On a CPU each engine thread owns half the cores (`--torch-threads`). The decode thread is
the busy one; the prefill thread idles between bursts of prompts. While it idles, decode
steps run on all the cores. Before a prefill, the prefill thread takes its cores back and
waits until the borrowing decode step lets go of them, at its next decoder layer: two
OpenMP teams sharing cores spin at each other's barriers and both run about three times
slower (bench/README.md).
`torch.set_num_threads` is per thread, so each thread sets its own team size.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def set_threads(threads: int) -> None:
    """This thread's torch team size (0: leave it)."""
    if threads:
        torch.set_num_threads(threads)


class CoreLease:
    """Owns who may use the prefill thread's cores: the decode thread, between prefills.
    With `lent` 0 nothing is lent and every call only keeps the decode thread's team size."""

    def __init__(self, own: int, lent: int) -> None:
        self.own, self.lent = own, lent
        self._cond = threading.Condition()
        self._wanted = 0  # prefills running or waiting: their cores are not to be lent
        self._borrowed = False  # a decode step is running on the lent cores
        self._threads = 0  # the decode thread's team size as last set

    # --- decode thread ---------------------------------------------------------------
    @contextmanager
    def step(self) -> Iterator[None]:
        """One decode step: on the lent cores too unless a prefill wants them."""
        with self._cond:
            self._borrowed = bool(self.lent) and not self._wanted
        self._set(self.own + self.lent if self._borrowed else self.own)
        try:
            yield
        finally:
            self._give_back()

    def between_layers(self) -> None:
        """Within a borrowing step: if a prefill now wants its cores, hand them back at once
        (the rest of the step runs on the decode thread's own), so a prompt waits about one
        layer, not a whole step."""
        if self._borrowed and self._wanted:
            self._give_back()
            self._set(self.own)

    def _give_back(self) -> None:
        with self._cond:
            self._borrowed = False
            self._cond.notify_all()

    def _set(self, threads: int) -> None:
        if threads != self._threads:
            set_threads(threads)
            self._threads = threads

    # --- prefill thread --------------------------------------------------------------
    def __enter__(self) -> CoreLease:
        """Take the cores back for a prefill: wait for the borrowing step to end."""
        with self._cond:
            self._wanted += 1
            self._cond.wait_for(lambda: not self._borrowed)
        return self

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._wanted -= 1
