"""The step loop: admit, prefill, decode, stream, on one worker thread.

Each turn of the loop admits waiting requests into free rows (while rows are decoding,
about one decode step's worth of prompt per turn, at least one prompt and at most
`--max-prefill-tokens`: `Pacer`; every waiting prompt when none is), prefills them
together, streams their first tokens and merges them into the running batch, then
decodes one token for every row: continuous batching. While rows decode, the prompts
admitted (up to a piece each) are not prefilled apart: the next decode step computes them
in its own forward (`Runner.decode_mixed`, `--mixed-steps`), and they join after it. Prefill goes first, so every
decode step runs as many rows as have been admitted (on a 2-core CPU,
one thread on both cores gave half the TTFT and 31.5 rows per step where a prefill thread
beside a decode thread, a core each, gave 27; bench/README.md). When more adapters have
work than there are slots, the loop also time-slices the slots between steps
(`_rotate`): it parks the rows of an adapter whose turn is over (out of the batch, with
their KV, onto a shelf) and puts them back when their adapter's turn comes. Tokens cross
to the gRPC event loop through each request's queue (`Request.emit`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from loramux import faults
from loramux.engine.constraints import MaskPipeline
from loramux.engine.request import Completion, Constraint, Event, Finish, Outbox, Params, Request, TokenLogprob
from loramux.engine.scheduler import Followers, Pacer, Scheduler
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
from loramux.lora.slots import AdapterSlots, SlotsFull
from loramux.lora.store import AdapterRecord, AdapterStore
from loramux.model.chat import render_chat
from loramux.model.grammar import Grammars
from loramux.model.logprobs import token_logprobs
from loramux.model.prefix import BASE, BLOCK, PrefixCache
from loramux.model.runner import Batch, Group, Runner, merge
from loramux.model.sampling import Sampling, make_generator, sample
from loramux.model.threads import set_threads, single_threaded

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
    parked: bool = False  # on the shelf: its adapter gave its slot up (no pin held)
    namespace: str = BASE  # the identity of the weights its keys and values are made with
    past: object = None  # keys and values of its prompt's cached prefix, until prefilled
    origin: tuple[int, ...] = ()  # the ids of the cache blocks `past` starts with (`Group.origins`)
    stuck: bool = False  # its grammar cannot take another token: it ends (LENGTH)

    @property
    def hit(self) -> int:
        """Prompt tokens served from the prefix cache."""
        return 0 if self.past is None else self.past.shape[3]


class Engine:
    """Owns the scheduler, the running batch and the worker thread."""

    def __init__(self, runner: Runner, store: AdapterStore, slots: AdapterSlots, metrics,
                 max_batch_size: int, max_queue: int, max_model_len: int | None,
                 registry_path: Path | None = None, log_requests: bool = False,
                 max_slot_wait: float = 0.02, max_prefill_tokens: int | None = None,
                 torch_threads: int = 0, min_turn: float = 1.5, prefix: PrefixCache | None = None,
                 mixed_steps: bool = True) -> None:
        self.log_requests = log_requests
        self.registry_path = registry_path  # where RPC registrations persist across restarts
        self.runner = runner
        self.store = store
        self.slots = slots
        self.prefix = prefix  # None: every prompt is prefilled whole
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.pacer = Pacer(max_prefill_tokens, runner.forward_cost_tokens)  # a turn's prefill while rows decode
        self.followers = Followers()  # a moment's wait for the requests that follow those just ended
        self.max_model_len = min(max_model_len or runner.max_len, runner.max_len)
        # Submit tokenizes on the event loop: text longer than this many characters cannot
        # fit in max_model_len tokens, so it is refused before the tokenizer spends seconds on it.
        self._max_chars = self.max_model_len * max(map(len, runner.tokenizer.get_vocab()), default=1)
        self.scheduler = Scheduler(max_queue, max_slot_wait, min_turn)
        self.rows: list[Row] = []
        self.batch: Batch | None = None
        self.draining = False
        self._lock = threading.Lock()  # guards the scheduler and the counts below (pins change under it)
        self._admitted: Counter[str] = Counter()  # rows in prefill or in the batch, per adapter
        self._parked_rows: Counter[str] = Counter()  # of those, rows parked, per adapter
        self._parked: dict[str, float] = {}  # parked adapter -> when it was parked
        self._turns: dict[str, float] = {}  # adapter with active rows -> since when it has a slot
        self._held: set[str] = set()  # adapters due to be parked that get no new rows meanwhile
        self._shelf: dict[str, tuple[list[Row], Group]] = {}  # parked rows by adapter
        self._prefilled: deque[tuple[list[Row], Group]] = deque()  # prefilled, not yet in the batch
        # A prompt longer than one prefill's budget goes in pieces, one per turn, so that the
        # running rows get a decode step between them: (its row, its KV so far).
        self._piece = max_prefill_tokens or 512
        self._partial: tuple[Row, Group | None] | None = None
        # Rows admitted while others decode, whose prompts the next decode step computes in
        # its own forward (`Runner.decode_mixed`) instead of a prefill forward of their own.
        self._mixed_steps = mixed_steps and runner.mixes
        if mixed_steps and not runner.mixes:
            log.info("mixed steps off: they need loramux's attention function (a CPU with float32 compute and "
                     "--cpu-attention-kernel fused); prompts are prefilled between decode steps")
        self._riders: list[Row] = []
        self._wake = threading.Event()  # new work (a request, a cancel, a freed slot)
        self._stop = False
        self._torch_threads = torch_threads  # torch's team size is per thread: the worker sets its own
        self._threads = [threading.Thread(target=self._loop, name="loramux-engine", daemon=True)]
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="loramux-prefetch", initializer=single_threaded)
        self.grammars = Grammars(runner.tokenizer, int(runner.model.config.vocab_size), runner.eos_ids)
        self.masks = MaskPipeline(metrics)

    # --- called from the gRPC event loop -------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()
        self._prefetch.submit(self.grammars.tokenizer)  # ~0.7 s, off the first constrained request

    def submit(self, adapter_id: str, prompt: str, params: Params, request_id: str,
               timeout: float | None, messages: Sequence[tuple[str, str]] | None = None,
               grammar: object = None) -> Request:
        """Queue a request for `prompt`, or for `messages` (role, content) rendered with the
        model's chat template (then `prompt` is ignored). `grammar`: its constraint already
        compiled (`compile`); else it is compiled here."""
        if self.draining:
            raise Unavailable("server is shutting down; retry on another replica")
        if adapter_id:
            self.store.get(adapter_id)
        if messages is not None:
            prompt = render_chat(self.runner.tokenizer, messages)
        if len(prompt) > self._max_chars:  # tokenizing megabytes would stall every other RPC
            raise InvalidArgument(
                f"prompt is {len(prompt)} characters; no prompt over {self._max_chars} fits this model's "
                f"{self.max_model_len} tokens (its longest token is {self._max_chars // self.max_model_len} characters)"
            )
        ids = self.runner.tokenizer(prompt).input_ids
        if not ids:  # a normalizer that strips the text and no BOS: no position to predict from
            raise InvalidArgument(
                "the prompt is empty once tokenized: this model's tokenizer keeps none of its text; send some text"
            )
        if len(ids) >= self.max_model_len:
            what = "the rendered conversation" if messages is not None else "prompt"
            raise InvalidArgument(
                f"{what} is {len(ids)} tokens; this model allows at most {self.max_model_len - 1} "
                "(one position must stay free for the answer)"
            )
        deadline = time.monotonic() + timeout if timeout is not None else None
        req = Request(adapter_id, ids, params, request_id, deadline, asyncio.get_running_loop())
        if params.constraint is not None:
            req.grammar = grammar if grammar is not None else self._compile(params.constraint)
        req.inject_fault = faults.marked(prompt)
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

    async def prefetch(self, adapter_id: str) -> None:
        """Warm the host cache for an adapter, on the engine's single-threaded prefetch thread."""
        await asyncio.wrap_future(self._prefetch.submit(self.slots.prefetch, adapter_id))

    async def compile(self, constraint) -> object:
        """`_compile` off the event loop: a new schema takes milliseconds, a pathological one
        (or the first, while the grammar tokenizer is still being built) up to a second, and
        every other RPC would wait for it."""
        return await asyncio.to_thread(self._compile, constraint)

    def _compile(self, c) -> object:
        """A matcher for a request's constraint (the cache's, or compiled now); raises
        InvalidArgument with the compiler's reason."""
        grammar, hit = self.grammars.compile(c.kind, c.text, c.choices)
        (self.metrics.grammar_cache_hits if hit else self.metrics.grammar_cache_misses).inc()
        if not hit:
            self.metrics.grammar_compile_seconds.observe(self.grammars.last_compile_s)
        return grammar

    def cancel(self, req: Request) -> None:
        req.cancelled = True
        self._wake.set()  # it leaves the queue or the batch

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

    async def complete(self, req: Request) -> Completion:
        """Run a request to its end: its text, tokens, finish reason (and logprobs, if asked)."""
        text, tokens, finish, logprobs = [], [], None, []
        async for event in self.events(req):
            text.append(event.text)
            tokens += event.token_ids
            logprobs += event.logprobs
            finish = event.finish
        return Completion("".join(text), tokens, finish, logprobs)

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
        if self.prefix is not None:
            self.prefix.forget(adapter_id)
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
            return not self._admitted and not len(self.scheduler)

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._prefetch.shutdown(wait=False, cancel_futures=True)
        self.masks.stop()

    # --- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        set_threads(self._torch_threads)
        while not self._stop:
            try:
                admitted = self._admit()
            except Exception:  # never let the loop die (_admit ends the requests it took itself)
                log.exception("admission failed")
                admitted = False
            try:
                self._join_prefilled()
                self._drop_gone_rows()
                self._rotate()
                if self.rows:
                    self._decode()
                elif self._riders:  # the rows they were to ride with are gone: prefill them
                    riders, self._riders = self._riders, []
                    self._prefill_waves(riders)
            except Exception as exc:  # never let the loop die
                log.exception("engine step failed")
                self._abandon_rows(exc)
            self.metrics.running.set(len(self.rows))
            self.metrics.parked.set(sum(len(rows) for rows, _ in self._shelf.values()))
            if not self.rows and not admitted:  # parked rows wait for a slot to free
                self._wake.wait(timeout=0.05 if self._shelf else 0.5)
                self._wake.clear()

    def _await_followers(self, step_s: float) -> None:
        """After a step of `step_s` that ended requests, with room and nothing waiting, wait a
        moment for the requests that follow them (`Followers`): on bench.prefix ~5 ms less
        bookkeeping after a step, and clients that resend at once arrived just after the next
        step began, doubling the cache-on side's TTFT p50 (~260 -> ~480 ms; bench/README.md,
        stop 35)."""
        if len(self.rows) >= self.max_batch_size:
            return
        self._wake.clear()  # a request queued before this is seen below; one after it sets the event
        with self._lock:
            waiting = len(self.scheduler) > 0
        timeout = 0.0 if waiting or self._riders else self.followers.timeout(step_s)
        if timeout > 0:
            self.followers.waited(self._wake.wait(timeout=timeout))

    def _join_prefilled(self) -> None:
        """Merge the rows just prefilled into the batch (their first token is out)."""
        while self._prefilled:
            rows, group = self._prefilled.popleft()
            keep = [i for i, row in enumerate(rows) if not row.req.done]
            if len(keep) < len(rows):  # ended at their first token (already released)
                if not keep:
                    continue
                rows, group = [rows[i] for i in keep], group.select(keep)
            try:
                if any(r.req.inject_fault == "join" for r in rows):
                    raise faults.InjectedFault("injected fault joining the batch")
                self._join(rows, group)
            except Exception as exc:  # e.g. out of memory growing the buffers: these rows end, not hang
                log.exception("joining prefilled rows to the batch failed")
                self._fail_prefilled(rows, exc)
                continue
            if any(r.req.inject_fault == "crash" for r in rows):  # checked once per row, not per step
                raise faults.InjectedFault("injected engine crash")

    def _join(self, rows: list[Row], group: Group) -> None:
        # Buffers for the rows admitted or waiting (a full batch at most): a wave of arrivals
        # joins in several groups, and growing the rows as they came copied the whole cache
        # each time (~0.5 s a wave of 32 rows of ~370 tokens on SmolLM2). Sized by demand, not
        # by --max-batch-size: a lone long request keeps the memory of one row, not of 32.
        room = min(self._admitted.total() + len(self.scheduler), self.max_batch_size)
        self.batch = merge(self.batch, group, room)
        self.rows += rows

    def _decode(self) -> None:
        riders = self._board()
        cached, rows = sum(r.hit for r in riders), len(self.rows)
        tokens = sum(len(r.req.prompt_ids) for r in riders) - cached
        started = time.perf_counter()
        ended = self._decode_step(riders)
        seconds = time.perf_counter() - started
        if riders:
            self.pacer.rode(tokens, seconds)
            self.metrics.mixed_prompt_tokens.inc(tokens)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("decode step of %d rows with %d prompts: %d tokens, %d cached, %.0f ms; turn budget %s "
                          "tokens", rows, len(riders), tokens, cached, 1e3 * seconds, self.pacer.budget())
        else:
            self.pacer.stepped(seconds)
        if ended:
            self._await_followers(seconds)

    def _decode_step(self, riders: list[Row]) -> bool:
        """One token for every running row; `riders`' prompts computed in the same forward.
        Whether requests ended."""
        self.metrics.batch_size.observe(len(self.rows))
        self.metrics.batch_adapters.observe(len({r.req.adapter_id for r in self.rows if r.req.adapter_id}))
        first, groups = None, []  # the riders' last-position logits and keys and values
        try:
            last = [r.req.generated[-1] for r in self.rows]
            if riders:
                logits, first, groups = self.runner.decode_mixed(
                    self.batch, last, [r.req.prompt_ids for r in riders], [r.slot for r in riders],
                    [r.past for r in riders], [r.origin for r in riders])
            else:
                logits = self.runner.decode(self.batch, last)
            tokens, logprobs = self._sample(self.rows, logits)
        except Exception as exc:
            log.exception("decode step failed")
            self._fail_rows(dict.fromkeys(range(len(self.rows)), Internal(f"model step failed: {exc}")))
            self._fail_prefilled(riders, exc)
            return False
        for row in riders:
            row.past = None
        for i, (row, group) in enumerate(zip(riders, groups, strict=True)):
            self._first_tokens([row], first[i:i + 1], group)
        now, outbox = time.monotonic(), Outbox()
        try:
            finished = [i for i, (row, token, lp) in enumerate(zip(self.rows, tokens, logprobs, strict=True))
                        if self._emit_token(row, token, now, outbox, lp)]
        finally:
            outbox.flush()
        # Every token of the step is out first: caching copies each rider's keys and values.
        for row, group in zip(riders, groups, strict=True):
            self._remember([row], group)
        if finished:
            self._remove(finished)
        return bool(finished)

    # --- admission and prefill -----------------------------------------------------------
    def _admit(self) -> bool:
        """Take waiting requests into free rows and prefill them together, or the next piece
        of a long prompt; False if there was nothing to do."""
        if self._partial is not None:
            self._prefill_piece()
            return True
        now = time.monotonic()
        with self._lock:
            gone = self.scheduler.remove_where(lambda r: r.cancelled or r.expired(now))
            free = self.max_batch_size - self._admitted.total()
            # While rows decode, a turn prefills about one decode step's worth (`Pacer`); with
            # none running, every waiting prompt is prefilled now (a wave of arrivals gets its
            # first tokens one prefill part after another, not one turn after another).
            budget = self.pacer.budget() if self.rows or self._prefilled else None
            picked = (self.scheduler.pick(free, self._admitted - self._parked_rows, self.slots.num_slots,
                                          budget, parked=self._parked, now=now, held=self._held,
                                          cost=self._uncached if self.prefix else None)
                      if free > 0 else [])
            self._admitted.update(r.adapter_id for r in picked)
            for r in picked:
                if r.adapter_id:
                    self._turns.setdefault(r.adapter_id, now)
            self.metrics.queue_depth.set(len(self.scheduler))
        for req in gone:
            self._fail(req, DeadlineExceeded("deadline passed while queued") if req.expired(now) else None)
        rows = [row for row in (self._admit_one(req) for req in picked) if row is not None]
        try:
            rows = self._take_riders(rows)
        except Exception as exc:  # a bug must not leave the rows taken waiting for their deadlines
            log.exception("admission failed")
            for row in rows:
                self._release(row)
                self._fail(row.req, Internal(f"admission failed: {exc}"))
            return True
        self._prefill_waves(rows)
        return bool(picked)

    def _admit_one(self, req: Request) -> Row | None:
        """`_start_row`; a request that fails there (a bug) ends alone, INTERNAL, instead of
        waiting for its deadline counted as admitted."""
        try:
            if req.inject_fault == "admit":
                raise faults.InjectedFault("injected fault admitting a request")
            return self._start_row(req)
        except Exception as exc:
            log.exception("admitting request %s failed", req.request_id)
            self._unadmit(req.adapter_id)
            self._fail(req, Internal(f"admission failed: {exc}"))
            return None

    def _take_riders(self, rows: list[Row]) -> list[Row]:
        """While rows decode, queue the short prompts to ride the next decode step; the rest."""
        if not (self._mixed_steps and self.rows):
            return rows
        rides = [self._uncached(r.req) <= self._piece and not r.req.inject_fault for r in rows]
        self._riders += [r for r, ride in zip(rows, rides, strict=True) if ride]
        return [r for r, ride in zip(rows, rides, strict=True) if not ride]

    def _prefill_waves(self, rows: list[Row]) -> None:
        for wave in self._waves(rows):
            self._look_up(wave)
            self._prefill_parts(wave)

    def _board(self) -> list[Row]:
        """The riders of this decode step: the first wave of those waiting (`_waves`: the rest
        wait for it to be cached), their cached prefixes looked up (cancelled ones ended in
        `_drop_gone_rows`)."""
        waves = self._waves(self._riders)
        board = waves[0] if waves else []
        self._riders = waves[1] if len(waves) > 1 else []
        self._look_up(board)
        return board

    def _prefill_parts(self, rows: list[Row]) -> None:
        """Prefill rows in parts of similar length (what each computes, after its cached prefix)."""
        for part in self.runner.prefill_parts([len(row.req.prompt_ids) - row.hit for row in rows]):
            row = rows[part[0]]
            if len(part) == 1 and len(row.req.prompt_ids) - row.hit > self._piece and self._partial is None:
                # One long prompt: a piece now, more each turn (after its cached prefix, if any).
                past = None if row.past is None else self.runner.group_from_past(row.past, row.slot, row.origin)
                self._partial = (row, past)
                row.past = None
                self._prefill_piece()
            else:
                self._prefill([rows[i] for i in part])

    def _waves(self, rows: list[Row]) -> list[list[Row]]:
        """Rows that share an uncached prefix with an earlier row of this admission wait for it
        to be prefilled (and cached) first, then take it from the cache: a burst of requests
        with one new system prompt computes it once per adapter, not once per request."""
        if self.prefix is None:
            return [rows]
        first, then, seen = [], [], set()
        for row in rows:
            ids = row.req.prompt_ids
            end = self.prefix.peek(row.namespace, ids) + BLOCK
            key = (row.namespace, tuple(ids[:end]))
            (then if len(ids) > end and key in seen else first).append(row)
            seen.add(key)
        return [w for w in (first, then) if w]

    def _look_up(self, rows: list[Row]) -> None:
        """Take each row's cached prefix (copied into its prefill; the cache may evict it after)."""
        if self.prefix is None:
            return
        for row in rows:
            try:
                row.past, row.origin = self.prefix.lookup_blocks(row.namespace, row.req.prompt_ids)
            except Exception:  # e.g. out of memory: a cache is never a reason to fail a request
                log.exception("prefix cache lookup failed; prefilling the whole prompt")
            row.req.cached_tokens = row.hit

    def _uncached(self, req: Request) -> int:
        """Prompt tokens a request's prefill would compute now: those the prefix cache lacks for
        the weights its adapter has in a slot (all of them if it has none)."""
        if self.prefix is None:
            return len(req.prompt_ids)
        namespace = self.slots.resident_identity(req.adapter_id) if req.adapter_id else BASE
        return len(req.prompt_ids) - (self.prefix.peek(namespace, req.prompt_ids) if namespace else 0)

    def _start_row(self, req: Request) -> Row | None:
        p = req.params
        sampling = Sampling(p.temperature, p.top_p, p.top_k, p.seed)
        gen = make_generator(sampling, self.runner.device)
        stream = TextStream(self.runner.tokenizer, p.stop)
        try:  # last: whatever can fail before it must not leave a slot pinned
            slot = self.slots.acquire(req.adapter_id) if req.adapter_id else -1
        except Exception as exc:
            self._unadmit(req.adapter_id)
            self._fail(req, _load_error(req.adapter_id, exc))
            return None
        req.admitted = time.monotonic()
        self.metrics.queue_wait.observe(req.admitted - req.arrived)
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        row = Row(req, stream, sampling, gen, slot)
        if self.prefix is not None:
            row.namespace = self.slots.identity(slot) if req.adapter_id else BASE
        return row

    def _prefill(self, rows: list[Row]) -> None:
        """Run the prompts, stream each first token, queue the rows to join the batch."""
        started = time.perf_counter()
        out = self._prefill_step(rows, lambda: self.runner.prefill([r.req.prompt_ids for r in rows],
                                                                   [r.slot for r in rows], [r.past for r in rows],
                                                                   [r.origin for r in rows]))
        seconds, widest = time.perf_counter() - started, max(len(r.req.prompt_ids) - r.hit for r in rows)
        if out is not None:
            self.pacer.prefilled(len(rows) * widest, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("prefill: %d rows of %d adapters, %d tokens, %d cached, widest %d computed, %.0f ms; "
                      "turn budget %s tokens", len(rows), len({r.req.adapter_id for r in rows}),
                      sum(len(r.req.prompt_ids) for r in rows), sum(r.hit for r in rows), widest, 1e3 * seconds,
                      self.pacer.budget())
        for row in rows:
            row.past = None  # copied into the group: the cache may evict it now
        if out is not None:
            self._first_tokens(rows, *out)  # streamed before the prompts' keys and values are copied
            self._remember(rows, out[1])

    def _remember(self, rows: list[Row], group: Group) -> None:
        """Cache the prompts' keys and values just computed, for prompts that start the same way."""
        if self.prefix is None:
            return
        for i, row in enumerate(rows):
            if row.req.adapter_id and row.req.adapter_id not in self.store:
                continue  # unregistered meanwhile: its blocks were dropped and must stay so
            ids = row.req.prompt_ids
            try:
                self.prefix.insert(row.namespace, row.req.adapter_id, ids, self.runner.row_kv(group, i, len(ids)))
            except Exception:  # e.g. out of memory copying: the request goes on, uncached
                log.exception("caching a prompt's keys and values failed")

    def _prefill_step(self, rows: list[Row], run: Callable[[], tuple]) -> tuple | None:
        """`run` a prefill forward for `rows`; on failure fail them (slots released) and None."""
        try:
            if any(r.req.inject_fault == "step" for r in rows):
                raise faults.InjectedFault("injected fault in a prefill step")
            return run()
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_prefilled(rows, exc)
            return None

    def _prefill_piece(self) -> None:
        """The next piece of the long prompt in progress; its first token after the last."""
        (row, group), self._partial = self._partial, None
        req = row.req
        if req.cancelled or req.expired(time.monotonic()):
            self._release(row)
            self._fail(req, None if req.cancelled else DeadlineExceeded("deadline passed while prefilling"))
            return
        done = 0 if group is None else group.next_pos[0]
        piece = req.prompt_ids[done:done + self._piece]
        out = self._prefill_step([row], lambda: (self.runner.prefill([piece], [row.slot]) if group is None
                                                 else self.runner.prefill_more(group, piece)))
        if out is None:
            return
        logits, group = out
        if group.next_pos[0] < len(req.prompt_ids):
            self._partial = (row, group)
            return
        self._remember([row], group)
        self._first_tokens([row], logits, group)

    def _first_tokens(self, rows: list[Row], logits, group: Group) -> None:
        """Sample and stream the first token of each prefilled row; queue them to join."""
        try:
            for i, row in enumerate(rows):
                if _greedy_choice(row):
                    self._choose(row, group, i, logits[i])
            tokens, logprobs = self._sample(rows, logits)
        except Exception as exc:
            log.exception("prefill failed")
            self._fail_prefilled(rows, exc)
            return
        try:
            now = time.monotonic()
            for row, token, lp in zip(rows, tokens, logprobs, strict=True):
                self._emit_token(row, token, now, logprob=lp)
        except Exception as exc:  # e.g. decoding a token: the rows must not stay counted
            log.exception("streaming first tokens failed")
            self._fail_prefilled([r for r in rows if not r.req.done], exc)
            return
        self._prefilled.append((rows, group))

    def _choose(self, row: Row, group: Group, i: int, last_logits) -> None:
        """A greedy choice is the candidate the model gives the highest probability whole (not
        token by token, where a likely first token can lead into an unlikely choice): scored in
        one forward after the prompt, then its grammar allows that candidate only."""
        choices = row.req.params.constraint.choices
        candidates = [self.grammars.choice_ids(c) or [self.runner.pad_id] for c in choices]
        n = len(row.req.prompt_ids)
        scores = self.runner.score(self.runner.row_kv(group, i, n)(0, n), last_logits, row.slot, candidates)
        best = choices[scores.index(max(scores))]
        row.req.grammar = self._compile(Constraint("choice", choices=(best,)))

    def _sample(self, rows: list[Row], logits) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row, constrained rows only among what their grammars allow, and the
        logprobs of the rows that asked, from the raw logits (before the masks, as before
        temperature: the masks write into `logits`, so those are copied when both are wanted)."""
        grammars = [r.req.grammar for r in rows]
        wanted = any(r.req.params.top_logprobs is not None for r in rows)
        raw = logits.clone() if wanted and any(g is not None for g in grammars) else logits
        self.masks.mask(logits, grammars)
        tokens = sample(logits, [r.sampling for r in rows], [r.generator for r in rows])
        for row, stuck in zip(rows, self.masks.advance(grammars, tokens), strict=True):
            row.stuck = stuck
        return tokens, self._logprobs(rows, raw, tokens)

    def _fail_prefilled(self, rows: list[Row], exc: Exception) -> None:
        for row in rows:
            self._release(row)
            self._fail(row.req, Internal(f"model step failed: {exc}"))

    def _logprobs(self, rows: list[Row], logits, tokens: list[int]) -> list[TokenLogprob | None]:
        """Each row's token logprob if its request asked (top_logprobs set), else None; rows
        that do not ask cost nothing."""
        out: list[TokenLogprob | None] = [None] * len(rows)
        asked = [i for i, r in enumerate(rows) if r.req.params.top_logprobs is not None]
        if not asked:
            return out
        tops = [rows[i].req.params.top_logprobs for i in asked]
        found = token_logprobs(logits, asked, [tokens[i] for i in asked], tops)
        decode = self.runner.tokenizer.decode
        for i, (logprob, ids, values) in zip(asked, found, strict=True):
            top = tuple((t, decode([t]), v) for t, v in zip(ids, values, strict=True))
            out[i] = TokenLogprob(tokens[i], decode([tokens[i]]), logprob, top)
        return out

    def _emit_token(self, row: Row, token: int, now: float, outbox: Outbox | None = None,
                    logprob: TokenLogprob | None = None) -> bool:
        """Append a row's new token and stream it (now, or with `outbox`); True (and the row
        released) if it ended."""
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
        req.emit(Event(text=text, token_ids=(token,), finish=finish,
                       logprobs=(logprob,) if logprob is not None else ()), outbox)
        if finish is not None:
            self._finished(row, now, finish)
        return finish is not None

    def _finish_reason(self, row: Row, token: int) -> Finish | None:
        req = row.req
        if token in self.runner.eos_ids and not req.params.ignore_eos:
            return Finish.EOS
        if len(req.generated) >= req.params.max_new_tokens or row.stuck:  # stuck: its grammar cannot go on
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

    def _abandon_rows(self, exc: Exception) -> None:
        """After a failure step() did not handle, the batch may no longer match the rows:
        end every running request (INTERNAL) rather than step a broken batch for ever.
        Queued requests are untouched and start afresh."""
        rows, self.rows, self.batch = self.rows, [], None
        for row in rows:
            if not row.req.done:
                row.req.emit(Event(error=Internal(f"engine step failed: {exc}")))
            try:
                self._release(row)
            except Exception:  # its slot may already be released; the rest must still end
                log.exception("releasing the slot of %s failed", row.req.request_id)

    def _drop_gone_rows(self) -> None:
        now = time.monotonic()

        def gone(rows: list[Row], when: str = "generating") -> dict[int, Exception | None]:
            expired = DeadlineExceeded(f"deadline passed while {when}")
            return {i: None if r.req.cancelled else expired for i, r in enumerate(rows)
                    if r.req.cancelled or r.req.expired(now)}

        errors = gone(self.rows)
        if errors:
            self._fail_rows(errors)
        for adapter_id, (rows, _) in list(self._shelf.items()):
            errors = gone(rows)
            if errors:
                self._fail_shelved(adapter_id, errors)
        errors = gone(self._riders, "queued")  # riders: admitted, their prompts not yet computed
        for i, error in errors.items():
            self._release(self._riders[i])
            self._fail(self._riders[i].req, error)
        self._riders = [r for i, r in enumerate(self._riders) if i not in errors]

    def _fail_rows(self, errors: dict[int, Exception | None]) -> None:
        """End running rows {index: error} (None: cancelled) and take them out of the batch."""
        for i, error in errors.items():
            self._release(self.rows[i])
            self._fail(self.rows[i].req, error)
        self._remove(list(errors))

    def _remove(self, indices: list[int]) -> None:
        """Take rows out of the batch; the batch fills the gaps from its end, the rows follow.
        A batch left empty keeps its buffers for the next rows: new ones are fresh memory,
        which this VM backs on first touch (~90,000 pages for 32 rows of vs_llamacpp's chats,
        up to ~2 s in its slow hours; bench/README.md, stop 38). So an idle server holds its
        batch's buffers at their peak size, as servers that preallocate their KV cache do."""
        if self.batch is None:
            self.rows = []
            return
        self._reorder(self.batch.remove(set(indices)))

    def _reorder(self, order: list[int]) -> None:
        """Rows in the order the batch left them (`Batch.remove`/`take`)."""
        self.rows = [self.rows[i] for i in order]

    # --- time-slicing the slots (between steps) -----------------------------------------
    def _rotate(self) -> None:
        """Park the rows of adapters whose turn is over and put back parked adapters whose
        turn has come (`Scheduler.rotate`). Pins change under the lock with the counts, so
        admission never sees a slot free that is still pinned, nor misses one."""
        if not self._shelf and len(self._turns) < self.slots.num_slots:
            self._held = set()
            return  # every adapter with work has a slot (read without the lock: a hint)
        now = time.monotonic()
        in_rows = Counter(r.req.adapter_id for r in self.rows)
        with self._lock:
            running = self._admitted - self._parked_rows
            movable = {a for a, n in in_rows.items() if a and n == running[a]}
            resume, park, hold = self.scheduler.rotate(running, self._parked, self._turns, movable,
                                                       self.slots.num_slots,
                                                       self.max_batch_size - self._admitted.total(), now)
            self._held = set(hold)
            for a in park:
                self._parked[a], self._parked_rows[a] = now, in_rows[a]
                del self._turns[a]
            for row in self.rows:
                if row.req.adapter_id in park:
                    row.parked = True
                    self.slots.release(row.req.adapter_id)
            back, failed = self._take_slots(resume, now)
        for a in park:
            self._shelve(a)
        if park:
            self.metrics.adapter_preemptions.inc(len(park))
            self._wake.set()
        for a, error in failed.items():
            self._fail_shelved(a, dict.fromkeys(range(len(self._shelf[a][0])), error))
        for a, slot in back.items():
            rows, group = self._shelf.pop(a)
            group.slots = [slot] * len(rows)
            self._join(rows, group)

    def _shelve(self, adapter_id: str) -> None:
        """Take an adapter's rows out of the batch, with their KV, onto the shelf."""
        take = {i for i, r in enumerate(self.rows) if r.req.adapter_id == adapter_id}
        rows = [self.rows[i] for i in sorted(take)]
        group, order = self.batch.take(take)  # copies: the batch, even left empty, keeps its buffers (`_remove`)
        self._reorder(order)
        self._shelf[adapter_id] = (rows, group)

    def _fail_shelved(self, adapter_id: str, errors: dict[int, Exception | None]) -> None:
        """End parked rows {index on the shelf: error} (None: cancelled)."""
        rows, group = self._shelf.pop(adapter_id)
        for i, error in errors.items():
            self._release(rows[i])
            self._fail(rows[i].req, error)
        keep = [i for i in range(len(rows)) if i not in errors]
        if keep:
            self._shelf[adapter_id] = ([rows[i] for i in keep], group.select(keep))

    def _take_slots(self, adapters: list[str], now: float) -> tuple[dict[str, int], dict[str, Exception]]:
        """Pin parked adapters' slots again (under the lock): {adapter: slot} for those whose
        rows go back into the batch, {adapter: error} for those that no longer load."""
        back, failed = {}, {}
        for a in adapters:
            rows = self._shelf[a][0]
            try:
                slot = self.slots.acquire(a)
            except SlotsFull:  # a pin outlived its count (should not happen): try next step
                log.warning("no slot to put adapter %r back; its rows stay parked", a)
                continue
            except Exception as exc:
                failed[a] = _load_error(a, exc)
                continue
            for _ in rows[1:]:
                self.slots.acquire(a)  # one pin per row; the adapter is resident now
            for row in rows:
                row.parked, row.slot = False, slot
            back[a] = slot
            del self._parked[a], self._parked_rows[a]
            self._turns.setdefault(a, now)
        return back, failed

    def _release(self, row: Row) -> None:
        """A row ends: its slot pin and its place in the batch go (once per admitted row).
        The pin goes first: admission must never count a slot free that is still pinned."""
        if row.req.adapter_id and not row.parked:
            self.slots.release(row.req.adapter_id)
        self._unadmit(row.req.adapter_id, row.parked)

    def _unadmit(self, adapter_id: str, parked: bool = False) -> None:
        with self._lock:
            self._admitted[adapter_id] -= 1
            if self._admitted[adapter_id] <= 0:
                del self._admitted[adapter_id]
            if parked:
                self._parked_rows[adapter_id] -= 1
                if self._parked_rows[adapter_id] <= 0:
                    del self._parked_rows[adapter_id]
                    del self._parked[adapter_id]
            elif self._admitted[adapter_id] <= self._parked_rows[adapter_id]:
                self._turns.pop(adapter_id, None)  # no active row left: its turn ends
        self._wake.set()  # queued requests or parked rows may take the slot

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


def _greedy_choice(row: Row) -> bool:
    c = row.req.params.constraint
    return c is not None and c.kind == "choice" and len(c.choices) > 1 and row.sampling.temperature == 0


def _load_error(adapter_id: str, exc: Exception) -> LoramuxError:
    """What a request hears when its adapter could not take a slot."""
    if isinstance(exc, LoramuxError):
        return exc
    log.error("loading adapter %s failed", adapter_id, exc_info=exc)
    return Internal(f"loading adapter {adapter_id!r} failed: {exc}")
