"""One OpenMP team per process: the engine thread's count holds whatever other threads set."""

from __future__ import annotations

import threading

import pytest
import torch

from loramux.model.threads import DEFAULT_THREADS, apart, set_threads, single_threaded


def on_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


@pytest.mark.skipif(DEFAULT_THREADS < 2, reason="needs two torch threads")
def test_a_threads_count_holds_after_another_thread_goes_single_threaded():
    ready, other_done = threading.Event(), threading.Event()
    seen = {}

    def engine():
        set_threads(2)
        ready.set()
        other_done.wait()
        torch.ones(1 << 20).sum()  # its first parallel op, after the other thread's change
        seen["threads"] = torch.get_num_threads()

    thread = threading.Thread(target=engine)
    thread.start()
    ready.wait()
    on_thread(single_threaded)
    other_done.set()
    thread.join()
    assert seen["threads"] == 2
    assert on_thread(lambda: (single_threaded(), torch.get_num_threads())[1]) == 1


def test_apart_returns_and_raises_in_the_caller():
    before = threading.active_count()
    assert apart(lambda: torch.get_num_threads(), 1) == 1
    with pytest.raises(ValueError, match="boom"):
        apart(lambda: (_ for _ in ()).throw(ValueError("boom")), 0)
    assert threading.active_count() == before  # its thread ended
