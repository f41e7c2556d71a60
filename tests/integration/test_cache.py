"""Acceptance 2: 5 adapters through 2 device slots stay right; misses and evictions show."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import ADAPTERS
from tests.server import ServerProcess


def test_five_adapters_two_slots(tmp_path, adapter_store, reference):
    for name in ADAPTERS:
        shutil.copytree(adapter_store[name], tmp_path / "adapters" / name)
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--max-active-adapters", "2",
                        "--host-cache-bytes", "3000000")  # room for some, not all, in host RAM
    try:
        with srv.client() as client:
            turns = list(ADAPTERS) * 2
            for adapter_id in turns:  # one at a time: every turn needs a load
                answer = client.generate("Hello world", adapter_id, max_new_tokens=10)
                assert list(answer.token_ids) == reference.generate(adapter_id, "Hello world", 10), adapter_id
            jobs = [(a, p) for a in ADAPTERS for p in ("Once upon", "1 2 3")]
            with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: at most 2 adapters per batch
                answers = list(pool.map(lambda j: client.generate(j[1], j[0], max_new_tokens=10), jobs))
            for (adapter_id, prompt), answer in zip(jobs, answers, strict=True):
                assert list(answer.token_ids) == reference.generate(adapter_id, prompt, 10), adapter_id
        m = srv.metrics()
        assert m["loramux_adapter_cache_misses_total"] >= len(turns)
        assert m["loramux_adapter_evictions_total"] >= len(turns) - 2
        assert m["loramux_adapters_active"] <= 2
        assert m["loramux_adapters_registered"] == len(ADAPTERS)
        assert m["loramux_adapter_load_seconds_count"] == m["loramux_adapter_cache_misses_total"]
        assert m["loramux_batch_adapters_bucket{le=\"2.0\"}"] == m["loramux_batch_adapters_count"]
        assert 0 < m["loramux_adapter_host_cache_bytes"] <= 3000000
        # Every projection of the tiny model is targeted by some adapter (r16-all): 2 slots x
        # rank 64 (--max-lora-rank) x (in + out) of its 4 x 7 layers, float32, plus the scalings.
        in_out = 4 * (2 * 256 + 2 * 384 + 512 + 2 * 960 + 960)
        assert m["loramux_lora_slot_memory_bytes"] == 4 * (2 * 64 * in_out + 2 * 4 * 7)
    finally:
        srv.stop()


def test_more_adapters_in_flight_than_slots_take_turns(tmp_path, adapter_store, reference):
    """One slot, two adapters: a long answer does not hold a second adapter's request until
    it ends. Its rows are parked (KV kept) while the other adapter takes the slot, then go
    on; both answers equal those of each request alone."""
    for name in ("r16-all", "r4-qv"):
        shutil.copytree(adapter_store[name], tmp_path / "adapters" / name)
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--max-active-adapters", "1",
                        "--max-slot-wait", "0.05", "--min-slot-turn", "0.2")
    try:
        with srv.client() as client:
            # ignore_eos holds the slot for 400 tokens (a random adapter may stop early)
            long = client.stream("Once upon a time", "r16-all", max_new_tokens=400, ignore_eos=True)
            long_tokens = list(next(long).token_ids)
            short = client.generate("Hello world", "r4-qv", max_new_tokens=10)
            assert list(short.token_ids) == reference.generate("r4-qv", "Hello world", 10)
            assert srv.metrics()["loramux_adapter_preemptions_total"] >= 1
            for event in long:
                long_tokens += event.token_ids
            assert len(long_tokens) == 400 and srv.metrics()["loramux_parked_requests"] == 0
            alone = client.generate("Once upon a time", "r16-all", max_new_tokens=400, ignore_eos=True)
            assert long_tokens == list(alone.token_ids)
    finally:
        srv.stop()
