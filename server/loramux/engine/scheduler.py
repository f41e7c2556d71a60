"""Admission: a queue per adapter, fair across adapters. Pure Python: no torch, no gRPC."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from loramux.engine.request import Request


class Scheduler:
    """Owns the waiting requests, one FIFO per adapter.

    `pick` fills free rows round-robin over adapters ordered by their oldest waiting
    request: the oldest request goes first, and a flood on one adapter cannot hold the
    others back by more than one row each per round.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._queues: OrderedDict[str, deque[Request]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def full(self) -> bool:
        return self._count >= self.max_queue

    def add(self, req: Request) -> None:
        self._queues.setdefault(req.adapter_id, deque()).append(req)
        self._count += 1

    def remove_where(self, pred: Callable[[Request], bool]) -> list[Request]:
        """Take out every waiting request matching `pred` (expired, cancelled, ...)."""
        removed = []
        for adapter_id in list(self._queues):
            queue = self._queues[adapter_id]
            keep = deque(r for r in queue if not pred(r))
            removed += [r for r in queue if pred(r)]
            self._set(adapter_id, keep)
        self._count -= len(removed)
        return removed

    def pick(self, free_rows: int, running_adapters: set[str], max_adapters: int) -> list[Request]:
        """Choose up to `free_rows` requests; distinct adapters in the batch (running ones
        included) stay within `max_adapters`, the number of device slots. The bare base,
        "", needs no slot."""
        picked: list[Request] = []
        batch = {a for a in running_adapters if a}
        while len(picked) < free_rows:
            progressed = False
            for adapter_id in sorted(self._queues, key=lambda a: self._queues[a][0].seq):
                if len(picked) >= free_rows:
                    break
                if adapter_id and adapter_id not in batch:
                    if len(batch) >= max_adapters:
                        continue
                    batch.add(adapter_id)
                queue = self._queues[adapter_id]
                picked.append(queue.popleft())
                self._set(adapter_id, queue)
                progressed = True
            if not progressed:
                break
        self._count -= len(picked)
        return picked

    def _set(self, adapter_id: str, queue: deque[Request]) -> None:
        if queue:
            self._queues[adapter_id] = queue
        else:
            self._queues.pop(adapter_id, None)
