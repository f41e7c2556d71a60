"""Admission: a queue per adapter, fair across adapters. Pure Python: no torch, no gRPC."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from loramux.engine.request import Request


class Scheduler:
    """Owns the waiting requests, one FIFO per adapter.

    `pick` fills free rows one at a time from the adapter with the fewest rows in the batch,
    oldest waiting request first among equals. Rows free up one or two per step, so plain
    oldest-first would hand each free row to the adapter that flooded the queue first;
    counting rows already running gives every waiting adapter its turn within a step or two.
    """

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self._queues: dict[str, deque[Request]] = {}
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

    def pick(self, free_rows: int, running: Counter[str], max_adapters: int) -> list[Request]:
        """Choose up to `free_rows` requests. `running` counts the batch's rows per adapter;
        distinct adapters in the batch stay within `max_adapters` (the device slots). The
        bare base, "", needs no slot."""
        rows = Counter(running)
        in_batch = {a for a, n in rows.items() if a and n > 0}
        picked: list[Request] = []
        while len(picked) < free_rows:
            ready = [a for a in self._queues if not a or a in in_batch or len(in_batch) < max_adapters]
            if not ready:
                break
            adapter_id = min(ready, key=lambda a: (rows[a], self._queues[a][0].seq))
            queue = self._queues[adapter_id]
            picked.append(queue.popleft())
            self._set(adapter_id, queue)
            rows[adapter_id] += 1
            if adapter_id:
                in_batch.add(adapter_id)
        self._count -= len(picked)
        return picked

    def _set(self, adapter_id: str, queue: deque[Request]) -> None:
        if queue:
            self._queues[adapter_id] = queue
        else:
            self._queues.pop(adapter_id, None)
