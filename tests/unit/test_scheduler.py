"""The scheduler as a table: who is admitted, step by step. No model, no torch."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from loramux.engine.request import Params, Request
from loramux.engine.scheduler import Scheduler


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def req(loop, adapter_id: str, name: str) -> Request:
    return Request(adapter_id, [1], Params(max_new_tokens=1), name, None, loop)


def names(reqs) -> list[str]:
    return [r.request_id for r in reqs]


def test_fewest_running_first_then_oldest(loop):
    s = Scheduler(max_queue=100)
    for name in ["a1", "a2", "a3", "a4"]:
        s.add(req(loop, "A", name))  # a flood on A arrives first
    s.add(req(loop, "B", "b1"))
    s.add(req(loop, "", "base1"))
    table = [
        # (free rows, rows running per adapter, slots) -> admitted, in order
        ((2, Counter(), 4), ["a1", "b1"]),  # equal shares (0): oldest first
        ((1, Counter(A=1, B=1)), ["base1"]),  # base has no row yet: its turn before A's older a2
        ((1, Counter(A=1, B=1, **{"": 1})), ["a2"]),
        ((5, Counter(A=2)), ["a3", "a4"]),
    ]
    for (free, running, *slots), expected in table:
        assert names(s.pick(free, running, slots[0] if slots else 4)) == expected
    assert len(s) == 0


def test_one_free_row_at_a_time_is_shared(loop):
    s = Scheduler(max_queue=100)
    for i in range(6):
        s.add(req(loop, "hot", f"h{i}"))
    s.add(req(loop, "cold", "c0"))
    running = Counter(hot=7)  # the hot adapter fills the batch; one row frees per step
    assert names(s.pick(1, running, 4)) == ["c0"]  # not the older h0: the cold adapter has no row


def test_distinct_adapters_bounded_by_slots(loop):
    s = Scheduler(max_queue=100)
    for a in "ABCD":
        s.add(req(loop, a, a.lower()))
    s.add(req(loop, "", "base"))
    assert names(s.pick(10, Counter(X=1), 2)) == ["a", "base"]  # X running holds one of two slots
    assert names(s.pick(10, Counter(), 2)) == ["b", "c"]
    assert names(s.pick(10, Counter(), 2)) == ["d"]


def test_full_and_remove_where(loop):
    s = Scheduler(max_queue=2)
    s.add(req(loop, "A", "x"))
    assert not s.full()
    s.add(req(loop, "B", "y"))
    assert s.full()
    gone = s.remove_where(lambda r: r.adapter_id == "A")
    assert names(gone) == ["x"] and len(s) == 1 and not s.full()


def test_slots_turn_over_after_max_slot_wait(loop):
    """Two slots held by hot adapters with steady traffic: a cold request gets no slot until it
    has waited max_slot_wait; then the hot adapter with fewer rows takes no new rows until its
    slot frees, and the cold adapter gets that slot before the hot adapter's own queue."""
    s = Scheduler(max_queue=100, max_slot_wait=1.0)
    cold = req(loop, "cold", "c0")
    s.add(cold)
    for i in range(4):
        s.add(req(loop, "hot1", f"h1-{i}"))
        s.add(req(loop, "hot2", f"h2-{i}"))
    t0 = cold.arrived
    table = [
        # (free rows, rows running per adapter, seconds since c0 arrived) -> admitted, in order
        ((2, Counter(hot1=3, hot2=1), 0.5), ["h2-0", "h2-1"]),  # c0 not starved yet
        ((1, Counter(hot1=4, hot2=2), 1.5), ["h1-0"]),  # c0 starved: hot2 (fewer rows) held back
        ((1, Counter(hot1=5, hot2=1), 2.0), ["h1-1"]),
        ((2, Counter(hot1=5), 2.5), ["c0", "h1-2"]),  # hot2's last row ended: its slot goes to c0
        ((5, Counter(hot1=5, cold=1), 3.0), ["h1-3"]),  # now hot2 is starved: cold is held back
        ((5, Counter(hot1=5), 3.5), ["h2-2", "h2-3"]),
    ]
    for (free, running, after), expected in table:
        assert names(s.pick(free, running, 2, now=t0 + after)) == expected
    assert len(s) == 0


def test_prefill_token_budget(loop):
    s = Scheduler(max_queue=100)
    for name, n in (("p40", 40), ("p100", 100), ("p10", 10), ("p300", 300)):
        r = req(loop, "", name)
        r.prompt_ids = [1] * n
        s.add(r)
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p40", "p100"]  # 3 x 100 > 256
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p10"]  # 2 x 300 > 256
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p300"]  # alone, whatever its length
