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
    finally:
        srv.stop()
