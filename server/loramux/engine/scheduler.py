"""Admission: a queue per adapter, fair across adapters. Pure Python: no torch, no gRPC."""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

from loramux.engine.request import Request


class Scheduler:
    """Owns the waiting requests, one FIFO per adapter, and the turns of the device slots.

    `pick` fills free rows one at a time from the adapter with the fewest rows in the batch,
    oldest waiting request first among equals. Rows free up one or two per step, so plain
    oldest-first would hand each free row to the adapter that flooded the queue first;
    counting rows already running gives every waiting adapter its turn within a step or two.

    Slots are time-sliced (`rotate`) when more adapters have work than there are slots:
    a queued adapter without running rows whose request waited `max_slot_wait` seconds
    parks a running adapter whose turn lasted `min_turn` (so that slots do not churn);
    parked rows wait out of the batch with their KV and get the next free slots. Without
    that, a request for a cold adapter waited for a whole answer of some resident adapter
    to end (p50 TTFT 10x and 53x idle with 32 and 128 adapters on 16 slots; bench/README.md).
    """

    def __init__(self, max_queue: int, max_slot_wait: float = 0.02, min_turn: float = 1.5) -> None:
        self.max_queue = max_queue
        self.max_slot_wait = max_slot_wait
        self.min_turn = min_turn
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

    def pick(self, free_rows: int, running: Counter[str], max_adapters: int, max_tokens: int | None = None,
             parked: dict[str, float] | None = None, now: float | None = None,
             held: set[str] | frozenset[str] = frozenset(),
             cost: Callable[[Request], int] | None = None) -> list[Request]:
        """Choose up to `free_rows` requests. `running` counts the batch's active rows per
        adapter; distinct adapters in the batch stay within `max_adapters` (the device
        slots), and a new adapter takes a slot before parked ones ({adapter: time parked})
        only once its oldest request has waited `max_slot_wait` (at `now`). The bare base,
        "", needs no slot. `max_tokens` bounds the picked prompts as one left-padded
        prefill (rows x longest), at least one request whatever its length; `cost` says
        how many of a prompt's tokens the prefill computes (all, unless the prefix cache
        holds some). `held` adapters (see `rotate`) get no new rows."""
        rows = Counter(running)
        in_batch = {a for a, n in rows.items() if a and n > 0}
        parked = parked or {}
        picked: list[Request] = []
        widest = 0  # the longest picked prompt: the prefill's padded width

        def has_slot(a: str) -> bool:
            if a in held:
                return False
            if not a or a in in_batch:
                return True
            starving = now is not None and now - self._queues[a][0].arrived >= self.max_slot_wait
            ahead = 0 if starving else sum(1 for b in parked if b != a and b not in in_batch)
            return len(in_batch) + ahead < max_adapters

        while len(picked) < free_rows:
            ready = [a for a in self._queues if has_slot(a)]
            if not ready:
                break
            adapter_id = min(ready, key=lambda a: (rows[a], self._queues[a][0].seq))
            queue = self._queues[adapter_id]
            width = max(widest, cost(queue[0]) if cost else len(queue[0].prompt_ids))
            if picked and max_tokens is not None and width * (len(picked) + 1) > max_tokens:
                break
            widest = width
            picked.append(queue.popleft())
            self._set(adapter_id, queue)
            rows[adapter_id] += 1
            if adapter_id:
                in_batch.add(adapter_id)
        self._count -= len(picked)
        return picked

    def rotate(self, running: Counter[str], parked: dict[str, float], turns: dict[str, float],
               movable: set[str], max_adapters: int, free_rows: int,
               now: float) -> tuple[list[str], list[str], list[str]]:
        """The slots' turns between two steps: (parked adapters to resume, running adapters
        to park, running adapters to hold). `running` counts active rows per adapter,
        `parked` says since when each parked adapter waits, `turns` since when each running
        adapter holds its slot. Only `movable` adapters (all rows in the batch, none in
        prefill) can be parked; a chosen one that is not is *held*: `pick` gives it no new
        rows until its rows in prefill have joined, so a hot adapter cannot dodge its turn.

        Slots go first to queued adapters whose oldest request waited `max_slot_wait` (no
        first token yet), then to parked adapters, oldest first, then to the other queued
        ones (a queued adapter's slot is left to `pick`). Each of the first kind left
        without a slot, and each parked adapter that waited `min_turn`, parks one running
        adapter whose turn lasted `min_turn`: movable ones first, then the one with the
        fewest rows, then the longest turn. A parked adapter that runs again (a new request
        of its own brought it back) resumes without a slot of its own."""
        in_batch = {a for a, n in running.items() if a and n > 0}
        queued = sorted((a for a in self._queues if a and a not in in_batch),
                        key=lambda a: self._queues[a][0].arrived)[:max(free_rows, 0)]  # each needs a row
        starving = [a for a in queued if now - self._queues[a][0].arrived >= self.max_slot_wait]
        waiting = sorted((a for a in parked if a not in in_batch and a not in starving), key=lambda a: parked[a])
        order = starving + waiting + [a for a in queued if a not in starving and a not in parked]
        free = max(max_adapters - len(in_batch), 0)
        resume = [a for a in parked if a in in_batch] + [a for a in order[:free] if a in parked]
        need = sum(1 for a in order[free:] if a in starving or now - parked.get(a, now) >= self.min_turn)
        victims = sorted((a for a, t in turns.items() if a in in_batch and now - t >= self.min_turn),
                         key=lambda a: (a not in movable, running[a], turns[a]))[:need]
        return resume, [a for a in victims if a in movable], [a for a in victims if a not in movable]

    def _set(self, adapter_id: str, queue: deque[Request]) -> None:
        if queue:
            self._queues[adapter_id] = queue
        else:
            self._queues.pop(adapter_id, None)


class Pacer:
    """Owns the running estimates that size a turn's prefill while rows are decoding.

    A turn prefills up to the tokens that cost about as much as one decode step, at least
    one prompt: with a decode step d cheaper than a prompt's prefill, admitting a wave of
    waiting prompts one turn's worth at a time gives lower mean time to first token than
    prefilling them all together (the k-th waits ~k turns instead of the whole wave's
    prefill) and keeps running rows' time per token within ~2 d. It also stops a wave of
    requests that arrived together from being admitted, answered and resent together: on
    SmolLM2 on 2 cores a fixed 512-token turn kept 32 clients in waves of ~10 whose p50
    TTFT was 674 ms; ~one step's worth, 184 ms (bench/README.md, issue 16).

    Costs are measured as the engine runs (this VM's speed drifts, and an accelerator's
    steps cost another ratio entirely): exponential averages of a decode step's seconds and
    of a prefill's seconds per token, a prefill's fixed cost counted as `fixed_tokens`
    more tokens, so that the small prefills this pacing makes do not inflate the per-token
    estimate where a forward's fixed cost dominates (an accelerator).
    """

    def __init__(self, cap: int | None, fixed_tokens: float, weight: float = 0.2) -> None:
        self.cap = cap  # --max-prefill-tokens: never more per prefill (None: no bound, no pacing)
        self.fixed_tokens = fixed_tokens
        self.weight = weight
        self.step_s: float | None = None
        self.token_s: float | None = None

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.weight * (new - old)

    def stepped(self, seconds: float) -> None:
        """A decode step took `seconds`."""
        self.step_s = self._mix(self.step_s, seconds)

    def prefilled(self, tokens: int, seconds: float) -> None:
        """A prefill computed `tokens` (rows x widest) in `seconds`."""
        if tokens > 0:
            self.token_s = self._mix(self.token_s, seconds / (tokens + self.fixed_tokens))

    def rode(self, tokens: int, seconds: float) -> None:
        """A decode step that also computed `tokens` prompt tokens took `seconds`: what it took
        beyond a decode step is theirs (no forward's fixed cost: the step paid it)."""
        if tokens > 0 and self.step_s is not None:
            self.token_s = self._mix(self.token_s, max(seconds - self.step_s, 1e-6) / tokens)

    def budget(self) -> int | None:
        """Prompt tokens (rows x widest) for this turn's prefill while rows decode."""
        if self.cap is None or self.step_s is None or self.token_s is None:
            return self.cap
        return max(1, min(self.cap, int(self.step_s / self.token_s)))


class Followers:
    """Owns how long the engine waits, after a step that ended requests, for the requests
    that follow them before it starts the next step.

    A client that sends its next request as soon as one ends (a chat's next turn, an agent,
    a closed-loop benchmark) reaches the server a few ms after its last token (1-13 ms,
    median ~4, on SmolLM2's prefix workload on 2 cores): arriving just after the next step
    began, it waits that whole step and rides the one after. Waiting up to `share` of a
    decode step for it costs at most that share of the steps that ended requests; while
    fewer than `min_rate` of recent waits saw a request arrive (open-loop traffic, the end
    of a run) the engine does not wait at all, and tries again one step in `probe`.
    """

    def __init__(self, share: float = 0.05, min_rate: float = 0.25, weight: float = 0.2, probe: int = 16) -> None:
        self.share, self.min_rate, self.weight, self.probe = share, min_rate, weight, probe
        self.rate = 1.0  # exponential average: 1 if a request arrived during a wait
        self._skipped = 0

    def timeout(self, step_s: float | None) -> float:
        """Seconds to wait after this step (0: none)."""
        if step_s is None:
            return 0.0
        if self.rate < self.min_rate:
            self._skipped += 1
            if self._skipped < self.probe:
                return 0.0
        self._skipped = 0
        return self.share * step_s

    def waited(self, arrived: bool) -> None:
        self.rate += self.weight * (float(arrived) - self.rate)
