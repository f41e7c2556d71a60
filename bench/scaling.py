"""Adapter-count scaling: throughput and latency with 1, 8, 32, 128 registered adapters.

One server per adapter count (16 device slots, batches of up to 32 rows), 32 closed-loop
clients streaming over gRPC; the same prompts and token budgets for every count, only the
adapter of each request changes (power-law alpha = 1 popularity, and uniform). Every request
generates exactly its budget (ignore_eos): random adapters end their answers at EOS at
different points, which would change the work per run, not only the adapter count. An idle run
(one client, one request at a time) gives the idle time to first token.

    python -m bench.scaling                 # full run
    python -m bench.scaling --quick         # smoke run, under 2 minutes
    python -m bench.scaling --plot bench/results/scaling.png
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="1,8,32,128", help="comma-separated adapter counts")
    p.add_argument("--dist", default="powerlaw,uniform", help="powerlaw, uniform, or both (comma-separated)")
    p.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    p.add_argument("--requests", type=int, default=96, help="requests per loaded run")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--slots", type=int, default=16, help="--max-active-adapters of the server")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--idle-requests", type=int, default=12, help="requests of the idle run")
    c.add_length_options(p)
    p.add_argument("--seed", type=int, default=c.SEED)
    p.add_argument("--stop-at-eos", action="store_true",
                   help="let answers end at EOS (default: ignore_eos, every request generates exactly its "
                   "max_new_tokens, so every adapter count does the same work)")
    p.add_argument("--repeat", type=int, default=1,
                   help="loaded runs per configuration, round-robin over all of them; the table shows medians")
    p.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    c.add_run_options(p)  # --wait-quiet, --snapshot
    p.add_argument("--server-args", default="", help="more flags for every server, e.g. '--min-slot-turn 1'")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 and 8 adapters, 32 short requests")
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.dist, args.requests, args.idle_requests = "1,8", "powerlaw", 48, 4
        args.clients = min(args.clients, 16)
        args.new_tokens, args.prompt_tokens = "16,32", "32,64"
    return args



def main(argv=None) -> int:
    args = parse_args(argv)
    env = c.start(args.snapshot, args.model)
    counts = [int(x) for x in args.adapters.split(",")]
    dists = [d.strip() for d in args.dist.split(",") if d.strip()]
    prompt_range, new_range = c.ranges(args.prompt_tokens, args.new_tokens)
    adapters = c.ensure_adapters(max(counts), rank=args.rank)
    work = c.workdir("scaling")
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}")
    print(f"model {c.MODEL_NAME} nf4, {args.slots} slots, batch <= {args.max_batch_size}, "
          f"{args.clients} clients, {args.requests} requests per run, prompts {prompt_range}, "
          f"new tokens {new_range} ({'up to EOS' if args.stop_at_eos else 'exactly, ignore_eos'}), greedy; "
          f"logs in {work}", flush=True)

    servers, raw, idle = {}, [], None
    try:
        for n in counts:  # all servers up at once, so that repeats can go round-robin over them
            subset = {k: adapters[k] for k in list(adapters)[:n]}
            servers[n] = c.start_server(work / f"n{n}", subset, slots=args.slots, max_batch=args.max_batch_size,
                                        max_rank=max(args.rank, 8), extra=tuple(shlex.split(args.server_args)))
            c.warm_up(servers[n].address)
        srv = servers[counts[0]]
        reqs = c.make_requests(args.idle_requests, counts[0], dists[0], args.seed, prompt_range, new_range,
                               args.alpha, ignore_eos=not args.stop_at_eos)
        c.wait_for_quiet(args.wait_quiet)
        idle = c.run_load(srv.address, reqs, concurrency=1, server_pid=srv.proc.pid)
        print(f"idle (N={counts[0]}, 1 client): TTFT p50 {idle.ttft_p50_ms:.0f} ms, "
              f"TPOT p50 {idle.tpot_p50_ms:.1f} ms, {idle.tokens_per_s:.1f} tok/s", flush=True)
        for round_ in range(args.repeat):
            for n in counts:
                for dist in dists:
                    raw.append({"round": round_, **_loaded_run(args, servers[n], n, dist, prompt_range, new_range)})
    finally:
        for srv in servers.values():
            srv.stop()
    runs = _medians(raw)

    print()
    print(report(runs, idle))
    data = {"args": vars(args), "idle": idle.summary() if idle else None, "runs": runs, "raw_runs": raw}
    path = c.write_results("scaling" + ("-quick" if args.quick else ""), data, env)
    print(f"\nresults: {path}")
    if args.plot:
        plot(runs, args.plot)
    return 0 if all(r["errors"] == 0 for r in runs) else 1


def _loaded_run(args, srv, n: int, dist: str, prompt_range, new_range) -> dict:
    reqs = c.make_requests(args.requests, n, dist, args.seed, prompt_range, new_range, args.alpha,
                           ignore_eos=not args.stop_at_eos)
    c.wait_for_quiet(args.wait_quiet)
    res, stats = c.measured_load(srv, reqs, args.clients)
    print(f"N={n:>3} {dist:>8}: {res.tokens_per_s:7.1f} tok/s, TTFT p50 {res.ttft_p50_ms:.0f} ms "
          f"p99 {res.ttft_p99_ms:.0f} ms, TPOT p50 {res.tpot_p50_ms:.1f} ms, errors {res.errors}, "
          f"misses {stats['cache_misses']:.0f}, parks {stats['parks']:.0f}, "
          f"batch {stats['batch_size_mean']:.1f} rows ({stats['batch_size_busy']:.1f} while all busy) / "
          f"{stats['batch_adapters_mean']:.1f} adapters", flush=True)
    return {"adapters": n, "dist": dist, "distinct_adapters": len({r.adapter_id for r in reqs}),
            **res.summary(), **stats}


def _medians(raw: list[dict]) -> list[dict]:
    """One row per (adapters, dist): each figure's median over the repeats (errors: the sum),
    and the tokens/s of every repeat, so that the VM's drift shows."""
    out = []
    for key in dict.fromkeys((r["adapters"], r["dist"]) for r in raw):
        group = [r for r in raw if (r["adapters"], r["dist"]) == key]
        row = {k: (statistics.median(r[k] for r in group)
                   if isinstance(v, int | float) and any(r[k] != v for r in group) else v)
               for k, v in group[0].items() if k != "round"}
        row["errors"] = sum(r["errors"] for r in group)
        row["tokens_per_s_runs"] = [r["tokens_per_s"] for r in group]
        out.append(row)
    return out


def report(runs: list[dict], idle) -> str:
    headers = ["adapters", "dist", "distinct", "tok/s", "tok/s runs", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
               "rows/step", "rows/step all busy", "adapters/step", "misses", "parks", "busy cores", "x tok/s",
               "x TTFT p50", "x TPOT p50", "TTFT/idle"]
    rows = []
    for r in runs:
        base = next((b for b in runs if b["dist"] == r["dist"] and b["adapters"] == 1), None) or runs[0]
        rows.append([
            r["adapters"], r["dist"], r["distinct_adapters"], r["tokens_per_s"],
            "/".join(f"{x:.0f}" for x in r.get("tokens_per_s_runs", [])), r["ttft_p50_ms"],
            r["ttft_p99_ms"], r["tpot_p50_ms"], r["batch_size_mean"], r["batch_size_busy"], r["batch_adapters_mean"],
            int(r["cache_misses"]), r.get("parks", math.nan), r["foreign_cpu"],
            c.ratio(r["tokens_per_s"], base["tokens_per_s"]), c.ratio(r["ttft_p50_ms"], base["ttft_p50_ms"]),
            c.ratio(r["tpot_p50_ms"], base["tpot_p50_ms"]),
            c.ratio(r["ttft_p50_ms"], idle.ttft_p50_ms) if idle else math.nan,
        ])
    text = c.table(headers, rows, digits=2)
    if idle:
        text += (f"\n\nidle (1 client, {idle.requests} requests): TTFT p50 {idle.ttft_p50_ms:.1f} ms, "
                 f"p99 {idle.ttft_p99_ms:.1f} ms, TPOT p50 {idle.tpot_p50_ms:.1f} ms, {idle.tokens_per_s:.1f} tok/s")
        worst = max(runs, key=lambda r: r["ttft_p50_ms"])
        text += (f"\nloaded/idle p50 TTFT: worst {c.ratio(worst['ttft_p50_ms'], idle.ttft_p50_ms):.2f}x "
                 f"(N={worst['adapters']}, {worst['dist']}); target <= 3x")
    text += ("\nfigures: medians over the repeats (tok/s runs: each repeat, in order)"
             "\nx columns: ratio to N = 1 with the same distribution (tok/s: higher is better); TTFT/TPOT "
             "percentiles leave out the first wave of requests (all sent at t = 0); busy cores: CPU used by other "
             "processes during the run (the machine may be shared)")
    return text


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, dist in enumerate(sorted({r["dist"] for r in runs})):
        rs = [r for r in runs if r["dist"] == dist]
        xs, color = [r["adapters"] for r in rs], f"C{k}"
        ax1.plot(xs, [r["tokens_per_s"] for r in rs], marker="o", color=color, label=dist)
        ax2.plot(xs, [r["ttft_p50_ms"] for r in rs], marker="o", color=color, label=f"{dist} p50")
        ax2.plot(xs, [r["ttft_p99_ms"] for r in rs], marker="x", color=color, linestyle="--", label=f"{dist} p99")
    for ax, title in ((ax1, "generated tokens/s"), (ax2, "time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("registered adapters")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
