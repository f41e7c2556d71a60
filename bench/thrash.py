"""Cache thrash: 128 adapters through 8 device slots under power-law traffic.

The same requests (same prompts, token budgets and adapters) against three servers:

- resident: 128 slots, every adapter stays on the device once loaded (the baseline);
- thrash: 8 slots, adapters rotate through them from the host cache (LRU);
- thrash, no host cache: 8 slots and a host cache too small for any adapter, so every
  load reads the adapter file (from the OS page cache).

32 streaming clients, batches of up to 32 rows. Prints throughput and latency of each and
its ratio to the resident run, with the server's cache counters.

    python -m bench.thrash
    python -m bench.thrash --quick
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=128)
    p.add_argument("--slots", type=int, default=8, help="device slots of the thrash runs")
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--dist", default="powerlaw", help="powerlaw, uniform, or both (comma-separated)")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    c.add_length_options(p)
    p.add_argument("--no-host-cache-run", action="store_true", help="skip the run without a host cache")
    p.add_argument("--seed", type=int, default=c.SEED)
    c.add_run_options(p)  # --wait-quiet, --snapshot
    p.add_argument("--quick", action="store_true", help="smoke run: 32 adapters, 4 slots, 48 short requests")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.slots, args.requests, args.clients = 32, 4, 48, 16
        args.new_tokens, args.prompt_tokens, args.no_host_cache_run = "16,32", "32,64", True
    return args



def main(argv=None) -> int:
    args = parse_args(argv)
    env = c.start(args.snapshot, args.model)
    dists = [d.strip() for d in args.dist.split(",") if d.strip()]
    adapters = c.ensure_adapters(args.adapters, rank=args.rank)
    work = c.workdir("thrash")
    configs = [("resident", args.adapters, ()), ("thrash", args.slots, ())]
    if not args.no_host_cache_run:
        configs.append(("thrash, no host cache", args.slots, ("--host-cache-bytes", "1")))
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}")
    print(f"model {c.MODEL_NAME} nf4, {args.adapters} rank-{args.rank} adapters, {args.clients} clients, "
          f"{args.requests} requests, prompts {args.prompt_tokens}, new tokens {args.new_tokens}, greedy; "
          f"logs in {work}", flush=True)
    runs = []
    for label, slots, extra in configs:
        srv = c.start_server(work / label.replace(" ", "").replace(",", "-"), adapters, slots=slots,
                             max_batch=args.max_batch_size, max_rank=max(args.rank, 8), extra=extra)
        try:
            c.warm_up(srv.address)
            for dist in dists:
                reqs = c.make_requests(args.requests, args.adapters, dist, args.seed,
                                       *c.ranges(args.prompt_tokens, args.new_tokens), args.alpha)
                c.wait_for_quiet(args.wait_quiet)
                before = c.server_counters(srv)
                res = c.run_load(srv.address, reqs, concurrency=args.clients, server_pid=srv.proc.pid)
                stats = c.server_stats(before, c.server_counters(srv))
                runs.append({"config": label, "slots": slots, "dist": dist,
                             "distinct_adapters": len({r.adapter_id for r in reqs}), **res.summary(), **stats})
                print(f"{label} ({slots} slots, {dist}): {res.tokens_per_s:.1f} tok/s, "
                      f"TTFT p50 {res.ttft_p50_ms:.0f} ms, misses {stats['cache_misses']:.0f}, "
                      f"errors {res.errors}", flush=True)
        finally:
            srv.stop()
    print()
    print(report(runs))
    path = c.write_results("thrash" + ("-quick" if args.quick else ""), {"args": vars(args), "runs": runs}, env)
    print(f"\nresults: {path}")
    return 0 if all(r["errors"] == 0 for r in runs) else 1


def report(runs: list[dict]) -> str:
    headers = ["config", "slots", "dist", "distinct", "tok/s", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "rows/step", "adapters/step", "misses", "evictions", "parks", "load ms", "busy cores", "x tok/s"]
    rows = []
    for r in runs:
        base = next(b for b in runs if b["dist"] == r["dist"] and b["config"] == "resident")
        rows.append([r["config"], r["slots"], r["dist"], r["distinct_adapters"], r["tokens_per_s"],
                     r["ttft_p50_ms"], r["ttft_p99_ms"], r["tpot_p50_ms"], r["batch_size_mean"],
                     r["batch_adapters_mean"], int(r["cache_misses"]), int(r["evictions"]), r.get("parks", math.nan),
                     r["load_ms_mean"],
                     r["foreign_cpu"], c.ratio(r["tokens_per_s"], base["tokens_per_s"])])
    text = c.table(headers, rows, digits=2)
    text += ("\nx tok/s: throughput relative to the all-resident run on the same requests; load ms: mean "
             "adapter load (host or disk -> slot) on the server; busy cores: CPU used by other processes "
             "during the run; TTFT/TPOT leave out the first wave of requests (all sent at t = 0)")
    return text


if __name__ == "__main__":
    sys.exit(main())
