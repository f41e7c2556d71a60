"""Issue 5 load: 500+ concurrent calls over 50 adapters; nothing lost, memory returns,
backpressure answers at once, and a flood on one adapter does not starve the others."""

from __future__ import annotations

import asyncio
import shutil
import time

import psutil
import pytest

from tests import load
from tests.conftest import ADAPTERS
from tests.server import ServerProcess, wait_for

N_ADAPTERS = 50


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("stress")
    sources = list(ADAPTERS)
    for i in range(N_ADAPTERS):  # 50 registered adapters from the 5 distinct test adapters
        shutil.copytree(adapter_store[sources[i % len(sources)]], work / "adapters" / f"ad{i:02d}")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-active-adapters", "8",
                        "--max-batch-size", "32", "--max-queue", "400", "--adapter-scan-interval", "0")
    yield srv
    srv.stop()


def rss(server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def test_500_concurrent_calls_none_lost(server):
    adapters = [f"ad{i:02d}" for i in range(N_ADAPTERS)]
    load.run_sync(server.address, [load.Call(a, "warm up", 4, False) for a in adapters])  # touch every adapter
    before = rss(server)
    calls = load.mixed_calls(520, adapters, seed=1)
    start = time.monotonic()
    report = load.run_sync(server.address, calls, guard=300)
    elapsed = time.monotonic() - start
    counts, codes = report.counts(), report.codes()
    print(f"\nstress: sent {len(calls)}, {dict(counts)}, codes {dict(codes)}, {elapsed:.1f}s")
    assert sum(counts.values()) == len(calls)
    assert counts["lost"] == 0, codes
    assert counts["answered"] >= 300
    assert codes["RESOURCE_EXHAUSTED"] >= 1  # 520 at once > --max-queue 400: backpressure, not a hang
    assert counts["cancelled"] >= 1 and codes["DEADLINE_EXCEEDED"] >= 1
    def idle() -> bool:
        m = server.metrics()
        return m["loramux_running_requests"] == 0 and m["loramux_queue_depth"] == 0

    assert wait_for(idle, timeout=10)  # cancelled rows leave at the next step
    # A leak grows with every round; the allocator's high-water mark (KV buffers sized for
    # the widest batch) is reached in the first. So the limit is on the second round.
    first = rss(server)
    again = load.run_sync(server.address, calls, guard=300)
    assert again.counts()["lost"] == 0
    time.sleep(1.0)
    after = rss(server)
    print(f"stress: RSS before {before / 2**20:.0f} MiB, after one round {first / 2**20:.0f} MiB, "
          f"after two {after / 2**20:.0f} MiB")
    assert after <= first * 1.10


def test_flood_on_one_adapter_does_not_starve_others(server):
    # Long enough that "not starved" has room: with 24 tokens a request the flood took ~2 s
    # once the engine got faster, and the others' two rounds of slot turnover (11 adapters, 8
    # slots) came within noise of 0.3 of it (0.31 in one CI run, 0.14-0.25 in six local ones).
    flood = [load.Call("ad00", "Once upon a time", 64, False) for _ in range(200)]
    others = [load.Call(f"ad{i:02d}", "Hello world", 8, False) for i in range(1, 11)]
    idle = load.run_sync(server.address, others)  # the same requests on an idle server

    async def scenario():
        hot = asyncio.ensure_future(load.run(server.address, flood, guard=300))
        await asyncio.sleep(1.0)  # the flood is queued and running first
        cold = await load.run(server.address, others, guard=300)  # a channel of their own
        return await hot, cold

    hot, cold = asyncio.run(scenario())
    hot_lat = [o.latency for o in hot.outcomes if o.kind == "answered"]
    cold_lat = [o.latency for o in cold.outcomes if o.kind == "answered"]
    assert len(cold_lat) == len(others) and len(hot_lat) == len(flood)
    p99_cold, p99_idle, flood_time = load.percentile(cold_lat, 99), load.percentile(
        [o.latency for o in idle.outcomes], 99), max(hot_lat)
    print(f"\nfairness: others p99 {p99_cold:.2f}s under a 200-request flood (idle p99 {p99_idle:.2f}s); "
          f"the flood took {flood_time:.2f}s")
    assert p99_cold < 0.3 * flood_time  # admitted within a step or two, not after the flood
