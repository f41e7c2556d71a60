"""Structured output in the step loop: masks before sampling, grammars advanced after.

Constrained and free rows share one batch and one forward; only the constrained rows'
logits are masked before the batch is sampled. The masks of step t+1 depend only on the
tokens sampled at step t, so they are computed on a helper thread while the forward of
step t+1 runs (llguidance drops the GIL); the engine waits for them only when it samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loramux.model.grammar import RowGrammar, apply_masks
from loramux.model.threads import single_threaded

log = logging.getLogger(__name__)


class MaskPipeline:
    """Owns the helper thread that computes the next step's masks, and its pending work."""

    def __init__(self, metrics) -> None:
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loramux-masks", initializer=single_threaded)
        self._pending: Future | None = None
        self._pending_s = 0.0  # time the helper spent on the pending masks

    def mask(self, logits: torch.Tensor, grammars: Sequence[RowGrammar | None]) -> None:
        """Forbid, in `logits` [B, vocab], the tokens each row's grammar does not allow
        (`grammars[i]` is row i's, None for a free row)."""
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if not rows:
            return
        waited = time.perf_counter()
        self.wait()
        self.metrics.grammar_mask_wait_seconds.observe(time.perf_counter() - waited)
        started = time.thread_time()
        constrained = [grammars[i] for i in rows]
        for g in constrained:
            g.fill()  # rows that joined since the helper started: computed here
        apply_masks(logits, rows, constrained)
        self.metrics.grammar_mask_seconds.observe(time.thread_time() - started + self._pending_s)
        self._pending_s = 0.0

    def advance(self, grammars: Sequence[RowGrammar | None], tokens: Sequence[int]) -> list[bool]:
        """Feed each constrained row its sampled token and start computing the next masks;
        True for a row whose grammar cannot take another token (failed)."""
        self.wait()
        dead, going = [], []
        for g, token in zip(grammars, tokens, strict=True):
            ok = g is None or g.consume(token)
            if not ok:
                log.warning("a constrained row cannot continue: %s", g.failed().splitlines()[0])
            elif g is not None:
                going.append(g)  # an ended grammar's mask allows end-of-sequence only
            dead.append(not ok)
        if going:
            self._pending = self._pool.submit(self._fill, going)
        return dead

    def _fill(self, grammars: list[RowGrammar]) -> float:
        started = time.thread_time()  # CPU time: on 2 busy cores the thread's wall time is mostly waiting
        for g in grammars:
            g.fill()
        return time.thread_time() - started

    def wait(self) -> None:
        """Let the pending masks finish before anyone touches the matchers."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._pending_s = pending.result()

    def stop(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
