"""The step loop: admit, prefill, decode, stream, on one worker thread.

Each step decodes one token for every running row, then admits waiting requests into
free rows (prefill) and merges them into the batch: continuous batching. Tokens cross to
the gRPC event loop through each request's queue (`Request.emit`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loramux import faults
from loramux.engine.request import Event, Finish, Params, Request
from loramux.engine.scheduler import Scheduler
from loramux.engine.stream import TextStream
from loramux.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    LoramuxError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from loramux.lora import registry_file
from loramux.lora.slots import AdapterSlots
from loramux.lora.store import AdapterRecord, AdapterStore
from loramux.model.runner import Batch, Runner, merge, select
from loramux.model.sampling import Sampling, make_generator, sample

log = logging.getLogger(__name__)
request_log = logging.getLogger("loramux.requests")


@dataclass
class Row:
    """A running request's place in the batch."""

    req: Request
    stream: TextStream
    sampling: Sampling
    generator: object
    slot: int


class Engine:
    """Owns the scheduler, the running batch and the worker thread."""

    def __init__(self, runner: Runner, store: AdapterStore, slots: AdapterSlots, metrics,
                 max_batch_size: int, max_queue: int, max_model_len: int | None,
                 registry_path: Path | None = None, log_requests: bool = False) -> None:
        self.log_requests = log_requests
        self.registry_path = registry_path  # where RPC registrations persist across restarts
        self.runner = runner
        self.store = store
        self.slots = slots
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_model_len = min(max_model_len or runner.max_len, runner.max_len)
        self.scheduler = Scheduler(max_queue)
        self.rows: list[Row] = []
        self.batch: Batch | None = None
        self.draining = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="loramux-engine", daemon=True)
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="loramux-prefetch")

    # --- called from the gRPC event loop -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, adapter_id: str, prompt: str, params: Params, request_id: str,
               timeout: float | None) -> Request:
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if adapter_id:
            self.store.get(adapter_id)
        ids = self.runner.tokenizer(prompt).input_ids
        if len(ids) >= self.max_model_len:
            raise InvalidArgument(
                f"prompt is {len(ids)} tokens; this model allows at most {self.max_model_len - 1} "
                "(one position must stay free for the answer)"
            )
        deadline = time.monotonic() + timeout if timeout is not None else None
        req = Request(adapter_id, ids, params, request_id, deadline, asyncio.get_running_loop())
        marker = faults.step_marker()
        req.inject_fault = bool(marker) and marker in prompt
        with self._lock:
            if self.scheduler.full():
                raise ResourceExhausted(
                    f"queue is full ({self.scheduler.max_queue} waiting, --max-queue); retry later"
                )
            self.scheduler.add(req)
            self.metrics.queue_depth.set(len(self.scheduler))
        if adapter_id:
            self._prefetch.submit(self.slots.prefetch, adapter_id)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self._wake.set()

    async def events(self, req: Request) -> AsyncIterator[Event]:
        """A request's events until its finish; raises its error. Leaving early (the caller
        went away) cancels the request, which frees its row at the next step."""
        try:
            while True:
                event = await req.events.get()
                if event.error is not None:
                    raise event.error
                yield event
                if event.finish is not None:
                    return
        finally:
            if not req.done:
                self.cancel(req)

    async def complete(self, req: Request) -> tuple[str, list[int], Finish | None]:
        """Run a request to its end: (text, token ids, finish reason)."""
        text, tokens, finish = [], [], None
        async for event in self.events(req):
            text.append(event.text)
            tokens += event.token_ids
            finish = event.finish
        return "".join(text), tokens, finish

    def register(self, adapter_id: str, path: str | Path, source: str = "rpc") -> AdapterRecord:
        folder = self.store.resolve_path(str(path))
        record = self.store.add(self.store.inspect(adapter_id, folder, source))
        self.metrics.adapters_registered.set(len(self.store))
        if source == "rpc":
            self._persist()
        return record

    def restore(self) -> None:
        """Register again what was registered by RPC before a restart."""
        if self.registry_path is None:
            return
        for adapter_id, path in registry_file.read(self.registry_path).items():
            try:
                self.register(adapter_id, path)
            except LoramuxError as exc:
                log.warning("not restoring adapter %r from %s: %s", adapter_id, path, exc)

    def _persist(self) -> None:
        if self.registry_path is not None:
            rpc = {r.adapter_id: str(r.path) for r in self.store.list() if r.source == "rpc"}
            registry_file.write(self.registry_path, rpc)

    def unregister(self, adapter_id: str) -> AdapterRecord:
        record = self.store.remove(adapter_id)
        self.slots.forget(adapter_id)
        with self._lock:
            dropped = self.scheduler.remove_where(lambda r: r.adapter_id == adapter_id)
        for req in dropped:
            self._fail(req, NotFound(f"adapter {adapter_id!r} was unregistered while the request waited"))
        self.metrics.adapters_registered.set(len(self.store))
        if record.source == "rpc":
            self._persist()
        return record

    def idle(self) -> bool:
        with self._lock:
            return not self.rows and not len(self.scheduler)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._prefetch.shutdown(wait=False, cancel_futures=True)

    # --- the worker thread ---------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            try:
                busy = self.step()
            except Exception:  # never let the loop die; step() fails the affected rows
                log.exception("engine step failed")
                busy = True
            if not busy:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def step(self) -> bool:
        """Admission (prefill of new rows) first, then one decode step for every row; False
        when there is no work. Prefill first: a new request's first token never waits
        behind a decode step of the rows already running."""
        self._drop_gone_rows()
        self._admit()
        if self.rows:
            self._decode()
        self.metrics.running.set(len(self.rows))
        return bool(self.rows) or len(self.scheduler) > 0 and len(self.rows) < self.max_batch_size

    def _decode(self) -> None:
        self.metrics.batch_size.observe(len(self.rows))
        self.metrics.batch_adapters.observe(len({r.req.adapter_id for r in self.rows if r.req.adapter_id}))
        try:
            logits = self.runner.decode(self.batch, [r.req.generated[-1] for r in self.rows])
            tokens = sample(logits, [r.sampling for r in self.rows], [r.generator for r in self.rows])
        except Exception as exc:
            log.exception("decode step failed")
            self._fail_rows(dict.fromkeys(range(len(self.rows)), Internal(f"model step failed: {exc}")))
            return
        self._advance(tokens)

    def _admit(self) -> None:
        now = time.monotonic()
        with self._lock:
            gone = self.scheduler.remove_where(lambda r: r.cancelled or r.expired(now))
            free = self.max_batch_size - len(self.rows)
            running = Counter(r.req.adapter_id for r in self.rows)
            picked = self.scheduler.pick(free, running, self.slots.num_slots) if free > 0 else []
            self.metrics.queue_depth.set(len(self.scheduler))
        for req in gone:
            self._fail(req, DeadlineExceeded("deadline passed while queued") if req.expired(now) else None)
        rows = [row for row in (self._start_row(req) for req in picked) if row is not None]
        if rows:
            self._prefill(rows)

    def _start_row(self, req: Request) -> Row | None:
        try:
            slot = self.slots.acquire(req.adapter_id) if req.adapter_id else -1
        except LoramuxError as exc:
            self._fail(req, exc)
            return None
        except Exception as exc:
            log.exception("loading adapter %s failed", req.adapter_id)
            self._fail(req, Internal(f"loading adapter {req.adapter_id!r} failed: {exc}"))
            return None
        req.admitted = time.monotonic()
        self.metrics.queue_wait.observe(req.admitted - req.arrived)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        p = req.params
        sampling = Sampling(p.temperature, p.top_p, p.top_k, p.seed)
        gen = make_generator(sampling, self.runner.device)
        return Row(req, TextStream(self.runner.tokenizer, p.stop), sampling, gen, slot)

    def _prefill(self, rows: list[Row]) -> None:
        try:
            if any(r.req.inject_fault for r in rows):
                raise faults.InjectedFault("injected fault in a prefill step")
            logits, batch = self.runner.prefill([r.req.prompt_ids for r in rows], [r.slot for r in rows])
            tokens = sample(logits, [r.sampling for r in rows], [r.generator for r in rows])
        except Exception as exc:
            log.exception("prefill failed")
            for row in rows:
                self._release(row)
                self._fail(row.req, Internal(f"model step failed: {exc}"))
            return
        self.batch = merge(self.batch, batch)
        self.rows += rows
        first = len(self.rows) - len(rows)
        self._advance([None] * first + tokens, start=first)

    def _advance(self, tokens: list[int | None], start: int = 0) -> None:
        """Append each row's new token, stream it, and drop the rows that finished."""
        now = time.monotonic()
        finished = []
        for i in range(start, len(self.rows)):
            row, token = self.rows[i], tokens[i]
            req = row.req
            req.generated.append(token)
            if req.first_token is None:
                req.first_token = now
                self.metrics.ttft.observe(now - req.arrived)
            finish = self._finish_reason(row, token)
            text, stopped = ("", False) if token in self.runner.eos_ids else row.stream.push(token)
            if stopped:
                finish = Finish.STOP
            elif finish is not None:
                text += row.stream.flush()
            req.emit(Event(text=text, token_ids=(token,), finish=finish))
            if finish is not None:
                finished.append(i)
                self._finished(row, now, finish)
        if finished:
            self._remove(finished)

    def _finish_reason(self, row: Row, token: int) -> Finish | None:
        req = row.req
        if token in self.runner.eos_ids:
            return Finish.EOS
        if len(req.generated) >= req.params.max_new_tokens:
            return Finish.LENGTH
        if len(req.prompt_ids) + len(req.generated) >= self.max_model_len:
            return Finish.LENGTH
        return None

    def _finished(self, row: Row, now: float, finish: Finish) -> None:
        req = row.req
        if self.log_requests:
            self._log_request(req, "OK", finish)
        n = len(req.generated)
        self.metrics.generated_tokens.inc(n)
        self.metrics.request_duration.observe(now - req.arrived)
        if n > 1:
            self.metrics.tpot.observe((now - req.first_token) / (n - 1))
        self._release(row)

    def _drop_gone_rows(self) -> None:
        now = time.monotonic()
        expired = DeadlineExceeded("deadline passed while generating")
        gone = {i: None if r.req.cancelled else expired for i, r in enumerate(self.rows)
                if r.req.cancelled or r.req.expired(now)}
        if gone:
            self._fail_rows(gone)

    def _fail_rows(self, errors: dict[int, Exception | None]) -> None:
        """End running rows {index: error} (None: cancelled) and take them out of the batch."""
        for i, error in errors.items():
            self._release(self.rows[i])
            self._fail(self.rows[i].req, error)
        self._remove(list(errors))

    def _remove(self, indices: list[int]) -> None:
        drop = set(indices)
        keep = [i for i in range(len(self.rows)) if i not in drop]
        self.batch = select(self.batch, keep) if self.batch is not None else None
        self.rows = [self.rows[i] for i in keep]

    def _release(self, row: Row) -> None:
        if row.req.adapter_id:
            self.slots.release(row.req.adapter_id)

    def _fail(self, req: Request, error: Exception | None) -> None:
        """End a request with an error (None: it was cancelled, nobody is listening)."""
        req.emit(Event(error=error or Internal("cancelled")))
        if self.log_requests:
            code = getattr(error, "code", "INTERNAL") if error is not None else "CANCELLED"
            self._log_request(req, code, None)

    def _log_request(self, req: Request, status: str, finish: Finish | None) -> None:
        """One JSON line per request (--log-requests): who, how much, how long, how it ended."""
        now = time.monotonic()

        def since(t: float | None) -> float | None:
            return None if t is None else round(t - req.arrived, 6)

        request_log.info(json.dumps({
            "event": "request", "request_id": req.request_id, "adapter_id": req.adapter_id,
            "status": status, "finish": finish.name if finish else None,
            "prompt_tokens": len(req.prompt_ids), "generated_tokens": len(req.generated),
            "queue_wait_s": since(req.admitted), "ttft_s": since(req.first_token),
            "duration_s": round(now - req.arrived, 6),
        }))
