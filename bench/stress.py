"""Long-form stress run (issue 5): thousands of concurrent calls over many adapters.

    python -m bench.stress [--calls 2000] [--adapters 100] [--quick]

Prints calls sent / answered / rejected (by status) / lost, the server's RSS before and
after, and the fairness figure: p99 latency of requests on quiet adapters while one adapter
is flooded, against the same requests on an idle server. Loopback only, bounded in count
and time. The CI test (tests/integration/test_stress.py) is the short form of this.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path

import psutil

from tests import load
from tests.adapters import make_adapter
from tests.server import ServerProcess

RESULTS = Path(__file__).resolve().parent / "results"


def build_adapters(root: Path, base: Path, n: int) -> None:
    """n adapter folders from 5 distinct PEFT adapters (distinct content is not the point here)."""
    sources = [make_adapter(base, root / f".src{i}", rank=4 * (i + 1), seed=i) for i in range(5)]
    for i in range(n):
        shutil.copytree(sources[i % 5], root / "adapters" / f"ad{i:03d}")


def fairness(address: str, flood_n: int) -> dict:
    flood = [load.Call("ad000", "Once upon a time", 24, False) for _ in range(flood_n)]
    others = [load.Call(f"ad{i:03d}", "Hello world", 8, False) for i in range(1, 11)]
    idle = load.run_sync(address, others)

    async def scenario():
        hot = asyncio.ensure_future(load.run(address, flood, guard=900))
        await asyncio.sleep(1.0)
        cold = await load.run(address, others, guard=900)
        return await hot, cold

    hot, cold = asyncio.run(scenario())
    return {"flood_requests": flood_n,
            "others_p99_s": load.percentile([o.latency for o in cold.outcomes], 99),
            "others_idle_p99_s": load.percentile([o.latency for o in idle.outcomes], 99),
            "flood_duration_s": max(o.latency for o in hot.outcomes)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--adapters", type=int, default=100)
    ap.add_argument("--max-queue", type=int, default=1500)
    ap.add_argument("--quick", action="store_true", help="300 calls over 20 adapters")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.adapters, args.max_queue = 300, 20, 250
    from loramux.model.tiny import ensure_tiny_model

    base = ensure_tiny_model("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_adapters(work, base, args.adapters)
        srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-active-adapters", "16",
                            "--max-batch-size", "32", "--max-queue", str(args.max_queue))
        try:
            names = [f"ad{i:03d}" for i in range(args.adapters)]
            load.run_sync(srv.address, [load.Call(a, "warm", 4, False) for a in names])
            proc = psutil.Process(srv.proc.pid)
            before = proc.memory_info().rss
            start = time.monotonic()
            report = load.run_sync(srv.address, load.mixed_calls(args.calls, names, seed=7), guard=1800)
            elapsed = time.monotonic() - start
            time.sleep(1.0)
            after = proc.memory_info().rss
            result = {"calls": args.calls, "adapters": args.adapters, "seconds": round(elapsed, 1),
                      **{k: report.counts()[k] for k in ("answered", "rejected", "cancelled", "lost")},
                      "statuses": dict(report.codes()), "rss_before_mib": before / 2**20,
                      "rss_after_mib": after / 2**20, "fairness": fairness(srv.address, 200)}
        finally:
            srv.stop()
    print(f"{'sent':>6} {'answered':>9} {'rejected':>9} {'cancelled':>10} {'lost':>5} {'seconds':>8}")
    print(f"{result['calls']:>6} {result['answered']:>9} {result['rejected']:>9} {result['cancelled']:>10} "
          f"{result['lost']:>5} {result['seconds']:>8}")
    print("statuses:", result["statuses"])
    print(f"RSS before {result['rss_before_mib']:.0f} MiB, after {result['rss_after_mib']:.0f} MiB "
          f"({result['rss_after_mib'] / result['rss_before_mib'] - 1:+.1%})")
    f = result["fairness"]
    print(f"fairness: 10 requests on quiet adapters, p99 {f['others_p99_s']:.2f}s during a "
          f"{f['flood_requests']}-request flood on one adapter ({f['flood_duration_s']:.1f}s); "
          f"idle p99 {f['others_idle_p99_s']:.2f}s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "stress.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
