"""The scheduler as a table: who is admitted, step by step. No model, no torch."""

from __future__ import annotations

import asyncio

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


def test_round_robin_oldest_first(loop):
    s = Scheduler(max_queue=100)
    for name in ["a1", "a2", "a3", "a4"]:
        s.add(req(loop, "A", name))  # a flood on A arrives first
    s.add(req(loop, "B", "b1"))
    s.add(req(loop, "", "base1"))
    table = [
        # (free rows, running adapters, slots) -> names admitted
        ((2, set(), 4), ["a1", "b1"]),
        ((2, {"A", "B"}, 4), ["a2", "base1"]),  # a2 (older) before base1
        ((5, {"A"}, 4), ["a3", "a4"]),
    ]
    for (free, running, slots), expected in table:
        assert [r.request_id for r in s.pick(free, running, slots)] == expected
    assert len(s) == 0


def test_distinct_adapters_bounded_by_slots(loop):
    s = Scheduler(max_queue=100)
    for a in "ABCD":
        s.add(req(loop, a, a.lower()))
    s.add(req(loop, "", "base"))
    picked = s.pick(10, {"X"}, 2)  # X running holds one of two slots
    assert [r.request_id for r in picked] == ["a", "base"]
    assert [r.request_id for r in s.pick(10, set(), 2)] == ["b", "c"]
    assert [r.request_id for r in s.pick(10, set(), 2)] == ["d"]


def test_full_and_remove_where(loop):
    s = Scheduler(max_queue=2)
    s.add(req(loop, "A", "x"))
    assert not s.full()
    s.add(req(loop, "B", "y"))
    assert s.full()
    gone = s.remove_where(lambda r: r.adapter_id == "A")
    assert [r.request_id for r in gone] == ["x"] and len(s) == 1 and not s.full()
