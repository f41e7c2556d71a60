"""The scheduler as a table: who is admitted, step by step. No model, no torch."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from loramux.engine.request import Params, Request
from loramux.engine.scheduler import Followers, Pacer, Scheduler


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


def test_parked_adapters_get_free_slots_before_new_ones_until_those_starve(loop):
    s = Scheduler(max_queue=100, max_slot_wait=0.1)
    new = req(loop, "new", "n0")
    s.add(new)
    s.add(req(loop, "A", "a0"))  # A runs: it needs no new slot
    parked = {"P": new.arrived + 1.0}  # parked after n0 arrived: still ahead of it
    assert names(s.pick(5, Counter(A=1), 2, parked=parked, now=new.arrived + 0.05)) == ["a0"]
    assert names(s.pick(5, Counter(A=1), 3, parked=parked, now=new.arrived + 0.05)) == ["n0"]  # one each
    s.add(req(loop, "new2", "m0"))
    m0 = s._queues["new2"][0]
    assert names(s.pick(5, Counter(A=1), 2, parked=parked, now=m0.arrived + 0.2)) == ["m0"]  # starved


def test_rotate_parks_a_running_adapter_for_each_starved_waiter(loop):
    """Two slots, both running; a queued adapter that waited max_slot_wait, and a parked one
    that waited min_turn, each park the running adapter with the fewest rows (then the
    longest turn) among those whose turn lasted min_turn."""
    s = Scheduler(max_queue=100, max_slot_wait=0.1, min_turn=0.5)
    cold = req(loop, "cold", "c0")
    s.add(cold)
    t0 = cold.arrived
    running = Counter(A=2, B=1)
    turns = {"A": t0 - 3.0, "B": t0 - 1.0}
    table = [
        # (movable, free rows, parked {adapter: since}, seconds after c0) -> (resume, park, hold)
        (({"A", "B"}, 4, {}, 0.05), ([], [], [])),  # c0 has not waited long enough
        (({"A", "B"}, 4, {}, 0.2), ([], ["B"], [])),  # B: fewer rows, though A's turn is longer
        (({"A"}, 4, {}, 0.2), ([], ["A"], [])),  # B has a row in prefill: A instead
        ((set(), 4, {}, 0.2), ([], [], ["B"])),  # neither can go now: B gets no new rows till it can
        (({"A", "B"}, 0, {}, 0.2), ([], [], [])),  # no free row for c0: parking B would not help it
        (({"A", "B"}, 4, {"P": t0 - 0.5}, 0.2), ([], ["B", "A"], [])),  # P waited a turn too
        (({"A", "B"}, 4, {"P": t0 + 0.1}, 0.2), ([], ["B"], [])),  # ... not yet
    ]
    for (movable, free, parked, after), expected in table:
        assert s.rotate(running, parked, turns, movable, 2, free, t0 + after) == expected
    short = {"A": t0 - 3.0, "B": t0 - 0.2}  # B's turn began 0.4 s before the check: too short
    assert s.rotate(running, {}, short, {"A", "B"}, 2, 4, t0 + 0.2) == ([], ["A"], [])


def test_held_adapters_get_no_new_rows(loop):
    s = Scheduler(max_queue=100)
    s.add(req(loop, "hot", "h0"))
    s.add(req(loop, "cold", "c0"))
    assert names(s.pick(5, Counter(hot=3), 2, held={"hot"})) == ["c0"]
    assert names(s.pick(5, Counter(hot=3), 2)) == ["h0"]


def test_rotate_resumes_parked_adapters_oldest_first_after_starved_queued_ones(loop):
    s = Scheduler(max_queue=100, max_slot_wait=0.1, min_turn=5.0)
    queued = req(loop, "Q", "q0")
    s.add(queued)
    t0 = queued.arrived
    parked = {"P1": t0 - 0.5, "P2": t0 - 1.0, "P3": t0 - 0.2}
    # four slots, A runs: three free, for Q (starved), then P2 and P1
    assert s.rotate(Counter(A=1), parked, {"A": t0}, {"A"}, 4, 4, t0 + 3.0) == (["P2", "P1"], [], [])
    # before Q starves, the parked ones come first
    assert s.rotate(Counter(A=1), parked, {"A": t0}, {"A"}, 4, 4, t0 + 0.05) == (["P2", "P1", "P3"], [], [])
    # a new request of P3's own runs again: its parked rows join it at no slot's cost
    assert s.rotate(Counter(A=1, P3=1), parked, {"A": t0}, {"A"}, 4, 4, t0 + 3.0) == (["P3", "P2"], [], [])


def test_prefill_token_budget(loop):
    s = Scheduler(max_queue=100)
    for name, n in (("p40", 40), ("p100", 100), ("p10", 10), ("p300", 300)):
        r = req(loop, "", name)
        r.prompt_ids = [1] * n
        s.add(r)
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p40", "p100"]  # 3 x 100 > 256
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p10"]  # 2 x 300 > 256
    assert names(s.pick(10, Counter(), 4, max_tokens=256)) == ["p300"]  # alone, whatever its length


def test_pacer_gives_the_cap_until_it_has_measured_both_costs():
    pacer = Pacer(512, fixed_tokens=10)
    assert pacer.budget() == 512
    pacer.stepped(0.12)
    assert pacer.budget() == 512
    pacer.prefilled(40, 0.1)  # 2 ms a token, the fixed cost counted as 10 more tokens
    assert pacer.budget() == 60  # one 0.12 s step's worth
    assert Pacer(None, fixed_tokens=10).budget() is None


def test_pacer_budget_follows_the_measured_costs_within_bounds():
    pacer = Pacer(512, fixed_tokens=0, weight=1.0)
    pacer.stepped(0.01)
    pacer.prefilled(100, 1.0)  # a step is cheaper than one token: still one prompt per turn
    assert pacer.budget() == 1
    pacer.stepped(10.0)  # an accelerator-like ratio: the cap holds
    assert pacer.budget() == 512
    pacer.prefilled(0, 5.0)  # nothing computed (a failed prefill): not a measurement
    assert pacer.token_s == pytest.approx(0.01)


def test_pacer_averages_rather_than_jumps():
    pacer = Pacer(1000, fixed_tokens=0, weight=0.5)
    pacer.stepped(0.1)
    pacer.prefilled(100, 0.1)
    pacer.stepped(0.3)
    assert pacer.step_s == pytest.approx(0.2)
    assert pacer.budget() == 200


def test_pacer_charges_a_mixed_step_beyond_a_decode_step_to_its_prompt_tokens():
    pacer = Pacer(512, fixed_tokens=10, weight=1.0)
    pacer.rode(34, 0.3)  # no decode step measured yet: nothing to subtract from
    assert pacer.token_s is None
    pacer.stepped(0.12)
    pacer.rode(40, 0.2)  # ~0.08 s beyond a step for 40 tokens: 2 ms a token, no fixed cost
    assert pacer.token_s == pytest.approx(0.002)
    assert pacer.budget() in (59, 60)  # 0.12 / 0.002, give or take float rounding
    pacer.rode(40, 0.1)  # faster than a plain step (noise): a floor, never zero or negative
    assert 0 < pacer.token_s < 1e-6 and pacer.budget() == 512


def test_followers_wait_a_share_of_the_step_while_requests_come():
    f = Followers(share=0.05, min_rate=0.25, weight=0.5, probe=4)
    assert f.timeout(None) == 0.0  # no step measured yet
    assert f.timeout(0.2) == pytest.approx(0.01)
    for _ in range(3):  # waits that saw nothing arrive: rate 0.5, 0.25, 0.125
        f.waited(False)
    assert [f.timeout(0.2) for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.01)]  # then a probe
    f.waited(True)  # the probe saw one: rate 0.56, waiting again
    assert f.timeout(0.2) == pytest.approx(0.01)
