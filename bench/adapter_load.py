"""Adapter load latency: disk -> device slot and host cache -> device slot, ranks 8 and 64.

In-process, with the library's own parts wired as `app.build_engine` wires them: the
bench-30m base in 4-bit NF4, a `Runner` with stacked LoRA slots, an `AdapterStore` and
`AdapterSlots`. One slot (slot tensors padded to --max-lora-rank, as in the server) and
two adapters acquired in turn, each released after its acquire: every acquire evicts the
other adapter and loads its own.

- disk -> slot: the host cache entry is dropped before each acquire (read + parse the
  safetensors file, check finiteness, copy into the slot). The file itself is in the OS
  page cache after the first read, as it would be for a hot adapter on a server.
- host -> slot: the host cache is warm; the acquire copies tensors into the slot.

The time is the whole `acquire` (eviction of the other adapter included): what a request
waits for. The server's own `adapter_load_seconds` histogram (load only) is printed too.

    python -m bench.adapter_load
    python -m bench.adapter_load --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="8,64", help="comma-separated adapter ranks")
    p.add_argument("--iterations", type=int, default=300, help="timed acquires per (rank, tier)")
    p.add_argument("--max-lora-rank", type=int, default=64, help="slot rank, as the server's flag")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.add_run_options(p)  # --wait-quiet, --snapshot
    p.add_argument("--quick", action="store_true", help="smoke run: 30 iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.iterations = 30
    return args


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure(slots, store, device, ids: list[str], iterations: int, from_disk: bool) -> list[float]:
    """Acquire ids[0], ids[1], ids[0], ... into a 1-slot table; return seconds per acquire."""
    for aid in ids:  # warm: the file in the page cache, the tensors in the host cache
        slots.acquire(aid)
        slots.release(aid)
    times = []
    for i in range(iterations):
        aid = ids[i % len(ids)]
        if from_disk:
            slots.host.pop(aid, None)
        start = time.perf_counter()
        slots.acquire(aid)
        _sync(device)
        times.append(time.perf_counter() - start)
        slots.release(aid)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    env = c.start(args.snapshot, args.model)
    ranks = [int(x) for x in args.ranks.split(",")]
    folders = {r: c.ensure_adapters(2, rank=r) for r in ranks}
    runner, store, slots, metrics, device = c.in_process(1, args.max_lora_rank, args.device)
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}")
    print(f"model {c.MODEL_NAME} nf4 on {device}, 1 slot of rank {args.max_lora_rank}, "
          f"{len(runner.layers)} wrapped layers, {args.iterations} acquires per row", flush=True)
    rows, out = [], []
    for rank in ranks:
        ids = []
        for aid, folder in folders[rank].items():
            rid = f"r{rank}-{aid}"
            store.add(store.inspect(rid, folder.resolve(), "rpc"))
            ids.append(rid)
        size = store.get(ids[0]).size_bytes
        for tier, from_disk in (("disk -> slot", True), ("host -> slot", False)):
            hist = metrics.adapter_load_seconds
            before = _hist(hist)
            c.wait_for_quiet(args.wait_quiet)
            with c.CpuWatch() as watch:
                times = measure(slots, store, device, ids, args.iterations, from_disk)
            after = _hist(hist)
            load_mean = c.ratio(after[0] - before[0], after[1] - before[1])
            ms = [1e3 * t for t in times]
            rec = {"rank": rank, "tier": tier, "adapter_bytes": size, "iterations": len(ms),
                   "p50_ms": c.percentile(ms, 50), "p90_ms": c.percentile(ms, 90), "p99_ms": c.percentile(ms, 99),
                   "mean_ms": sum(ms) / len(ms), "server_load_mean_ms": 1e3 * load_mean,
                   "foreign_cpu": watch.foreign_cores}
            out.append(rec)
            rows.append([rank, tier, f"{size / 2**20:.2f}", rec["p50_ms"], rec["p90_ms"], rec["p99_ms"],
                         rec["mean_ms"], rec["server_load_mean_ms"], watch.foreign_cores])
            print(f"rank {rank:>2} {tier}: p50 {rec['p50_ms']:.2f} ms, p99 {rec['p99_ms']:.2f} ms", flush=True)
        for rid in ids:
            slots.forget(rid)
            store.remove(rid)
    print()
    print(c.table(["rank", "tier", "MiB", "p50 ms", "p90 ms", "p99 ms", "mean ms", "load-only ms", "busy cores"],
                  rows, digits=2))
    r8 = next((r for r in out if r["rank"] == 8 and r["tier"] == "host -> slot"), None)
    if r8:
        verdict = "meets" if r8["p50_ms"] < 5 else "BELOW"
        print(f"\nhost cache -> slot, rank 8: p50 {r8['p50_ms']:.2f} ms (target < 5 ms: {verdict})")
    print("load-only: the server's adapter_load_seconds mean (without the eviction of the other adapter); "
          "busy cores: CPU used by other processes meanwhile")
    data = {"args": vars(args), "device": str(device), "wrapped_layers": len(runner.layers), "results": out}
    path = c.write_results("adapter_load" + ("-quick" if args.quick else ""), data, env)
    print(f"\nresults: {path}")
    return 0


def _hist(hist) -> tuple[float, float]:
    """(sum, count) of a prometheus Histogram."""
    sums = count = 0.0
    for metric in hist.collect():
        for s in metric.samples:
            if s.name.endswith("_sum"):
                sums = s.value
            elif s.name.endswith("_count"):
                count = s.value
    return sums, count


if __name__ == "__main__":
    sys.exit(main())
