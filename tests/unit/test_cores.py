"""The decode thread borrows the prefill thread's cores only while no prefill runs."""

from __future__ import annotations

import threading

import torch

from loramux.engine.cores import CoreLease


def in_thread(fn):
    """Run fn on a new thread (torch team sizes are per thread); return its result."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", fn()))
    t.start()
    t.join(timeout=10)
    assert not t.is_alive()
    return out["r"]


def run_together(*fns) -> None:
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
        assert not t.is_alive()


def test_steps_borrow_the_cores_unless_a_prefill_wants_them():
    lease = CoreLease(own=1, lent=1)

    def steps():
        sizes = []
        with lease.step():
            sizes.append(torch.get_num_threads())
        with lease, lease.step():  # a prefill runs (here on the same thread: only the counts matter)
            sizes.append(torch.get_num_threads())
        with lease.step():
            sizes.append(torch.get_num_threads())
        return sizes

    assert in_thread(steps) == [2, 1, 2]


def test_nothing_is_borrowed_when_nothing_is_lent():
    lease = CoreLease(own=1, lent=0)

    def step():
        with lease.step():
            return torch.get_num_threads()

    assert in_thread(step) == 1


def test_a_prefill_waits_for_the_borrowing_step_to_end():
    lease = CoreLease(own=1, lent=1)
    step_started, prefill_entered = threading.Event(), threading.Event()
    order = []

    def decode():
        with lease.step():  # borrows: no prefill yet
            step_started.set()
            assert not prefill_entered.wait(timeout=0.3)  # the prefill is held back meanwhile
            order.append("step ended")

    def prefill():
        step_started.wait(timeout=5)
        with lease:
            order.append("prefill")
            prefill_entered.set()

    run_together(decode, prefill)
    assert order == ["step ended", "prefill"]


def test_a_borrowing_step_hands_the_cores_back_between_layers():
    lease = CoreLease(own=1, lent=1)
    step_started, prefill_entered = threading.Event(), threading.Event()
    sizes = []

    def decode():
        with lease.step():
            step_started.set()
            for _ in range(50):  # decoder layers, until the prefill got its cores
                lease.between_layers()
                if prefill_entered.wait(timeout=0.05):
                    break
            sizes.append(torch.get_num_threads())  # the rest of the step: own cores only

    def prefill():
        step_started.wait(timeout=5)
        with lease:
            prefill_entered.set()

    run_together(decode, prefill)
    assert prefill_entered.is_set() and sizes == [1]
