"""A generation request as the engine sees it, and the events it streams back."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

_ids = itertools.count()


class Finish(Enum):
    LENGTH = 1
    EOS = 2
    STOP = 3


@dataclass(frozen=True)
class Constraint:
    """What a request's answer must be: kind "json_schema" or "regex" with its text, or
    "choice" with the strings (structured output; compiled by `loramux.model.grammar`)."""

    kind: str
    text: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Params:
    """Validated sampling settings of one request."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate to max_new_tokens even past EOS
    top_logprobs: int | None = None  # None: no logprobs; k: each token's and the k likeliest
    constraint: Constraint | None = None  # structured output, or free text


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the raw distribution (before temperature,
    top-k, top-p) and the likeliest tokens at its step, most likely first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, token, logprob)


@dataclass(frozen=True)
class Event:
    """One step's output for a request: new text and tokens, or the end (finish or error)."""

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish: Finish | None = None
    error: Exception | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when the request asked


@dataclass(frozen=True)
class Completion:
    """A request's whole answer (`Engine.complete`)."""

    text: str
    token_ids: list[int]
    finish: Finish | None
    logprobs: list[TokenLogprob]


@dataclass(eq=False)
class Request:
    """Owns one request's state from submission to its last event."""

    adapter_id: str  # "" for the bare base
    prompt_ids: list[int]
    params: Params
    request_id: str
    deadline: float | None  # time.monotonic() value, or None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    admitted: float | None = None
    first_token: float | None = None
    generated: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    cancelled: bool = False
    done: bool = False
    grammar: object = None  # its matcher (model.grammar.RowGrammar), compiled at submit; a greedy choice narrows it
    inject_fault: str = ""  # "step", "crash", "join" or "admit": set only by fault-injection tests (loramux.faults)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def emit(self, event: Event, outbox: Outbox | None = None) -> None:
        """Hand an event to the request's event loop (called from the engine's threads),
        now or with the rest of `outbox`."""
        if event.finish is not None or event.error is not None:
            self.done = True
        if outbox is not None:
            outbox.events.setdefault(self.loop, []).append((self.events, event))
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Outbox:
    """Owns the events of one decode step until they are handed over, one wake-up of each
    event loop for all of them: a wake-up per token was ~2% of a decode step."""

    def __init__(self) -> None:
        self.events: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Event]]] = {}

    def flush(self) -> None:
        for loop, events in self.events.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody listens any more
                loop.call_soon_threadsafe(_deliver, events)
        self.events = {}


def _deliver(events: list[tuple[asyncio.Queue, Event]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)
