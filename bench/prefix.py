"""The prefix cache on against off, on the same requests, in one run (issue 16's targets).

Two servers (the default --prefix-cache-bytes, and 0), the same adapters, each workload run
on both one after the other:

(1) shared prefixes: 8 adapters, each with its own fixed instruction + few-shot system
    prompt (--prefix-tokens, 300), a 20-40 token question, 32 new tokens, 32 clients;
(2) multi-turn chats: conversations of 5 turns, each turn sending the whole history (the
    model's own answers included), all conversations at once; TTFT per turn;
(3) no shared prefix: raw prompts of 100-300 tokens that share no first block, 32 new
    tokens, 32 clients: what the lookup costs when it never hits.

and (1) again with one client (--idle-requests), each request's own time to first token.
TTFT p50 of the loaded runs leaves out the first wave (all clients' first requests at
once), as every bench here does; "all" includes it.

Every request generates exactly its budget (ignore_eos). Targets: (1) throughput >= 3x
and TTFT p50 <= 0.25x cache off; (2) turn-5 TTFT <= 1.5x turn 1 with the cache; (3) within
5% of cache off.

    python -m bench.prefix                 # full run (~15 minutes on 2 cores)
    python -m bench.prefix --quick         # smoke run
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402
from bench.chat_requests import QUESTIONS, count_tokens, render  # noqa: E402

TURNS = 5
_PASSAGE = Path(__file__).resolve().parent / "data" / "heldout.txt"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--requests", type=int, default=96, help="requests of workloads (1) and (3)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--prefix-tokens", type=int, default=300, help="tokens of each adapter's system prompt")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--idle-requests", type=int, default=12, help="shared-prefix requests sent by one client")
    p.add_argument("--conversations", type=int, default=8, help="multi-turn conversations, all at once")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=c.SEED)
    p.add_argument("--server-args", default="", help="more flags for both servers")
    c.add_run_options(p)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer requests and conversations")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.conversations, args.idle_requests = 32, 16, 4, 4
    return args


# --- requests ----------------------------------------------------------------------------
def _cut(tok, text: str, tokens: int) -> str:
    """`text` cut to its first `tokens` tokens (as text)."""
    return tok.decode(tok(text, add_special_tokens=False).input_ids[:tokens])


def system_prompts(tok, n: int, tokens: int, seed: int) -> list[str]:
    """Adapter i's fixed system prompt: instructions and few-shot examples, `tokens` long."""
    sentences = [s.strip() + "." for s in _PASSAGE.read_text().replace("\n", " ").split(".") if s.strip()]
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}-prefix-{i}")
        parts = [f"You are assistant number {i} of a support team. Answer in the style of the examples: "
                 "one or two plain sentences, no lists, no preamble."]
        while count_tokens(tok, " ".join(parts)) < tokens + 8:
            parts.append(f"Example question: {rng.choice(QUESTIONS)} Example answer: {rng.choice(sentences)}")
        out.append(_cut(tok, " ".join(parts), tokens))
    return out


def question(tok, rng: random.Random, lo: int = 20, hi: int = 40) -> str:
    words = _PASSAGE.read_text().split()
    start = rng.randrange(len(words) - 80)
    return _cut(tok, "Please explain: " + " ".join(words[start:start + 80]), rng.randint(lo, hi))


def shared_requests(tok, args, count: int, stream: str = "shared") -> list[c.BenchRequest]:
    """`count` questions after the adapters' system prompts (`stream` names the question draw)."""
    systems = system_prompts(tok, args.adapters, args.prefix_tokens, args.seed)
    rng = random.Random(f"{args.seed}-{stream}")
    out = []
    for i in range(count):
        a = rng.randrange(args.adapters)
        prompt = render(tok, systems[a], question(tok, rng))
        out.append(c.BenchRequest(i, c.adapter_id(a), prompt, count_tokens(tok, prompt), args.new_tokens, True))
    return out


def unshared_requests(tok, args) -> list[c.BenchRequest]:
    """Raw prompts of word salad: their first blocks differ, so nothing can hit."""
    rng = random.Random(f"{args.seed}-unshared")
    out = []
    for i in range(args.requests):
        text = " ".join(rng.choice(c.WORDS) for _ in range(400))
        prompt = _cut(tok, text, rng.randint(100, 300))
        out.append(c.BenchRequest(i, c.adapter_id(i % args.adapters), prompt, count_tokens(tok, prompt),
                                  args.new_tokens, True))
    return out


# --- runs ---------------------------------------------------------------------------------
def loaded(srv, reqs: list[c.BenchRequest], clients: int) -> dict:
    before = srv.metrics()
    res = c.run_load(srv.address, reqs, concurrency=clients, server_pid=srv.proc.pid)
    return {**res.summary(), **_hits(before, srv.metrics())}


def _hits(before: dict, after: dict) -> dict:
    def d(name: str) -> float:
        return after.get(f"loramux_{name}", 0.0) - before.get(f"loramux_{name}", 0.0)
    return {"hit_rate": c.ratio(d("prefix_cache_hit_tokens_total"), d("prefix_cache_query_tokens_total")),
            "cache_bytes": after.get("loramux_prefix_cache_bytes", 0.0)}


def multi_turn(srv, args) -> dict:
    """Every conversation at once, turn after turn; TTFT p50 per turn over conversations."""
    from loramux.client import Client

    ttft: list[list[float]] = [[] for _ in range(TURNS)]
    errors, lock = [], threading.Lock()

    def talk(k: int) -> None:
        rng = random.Random(f"{args.seed}-chat-{k}")
        messages: list[tuple[str, str]] = []
        with Client(srv.address, timeout=600) as client:
            for turn in range(TURNS):
                messages.append(("user", rng.choice(QUESTIONS)))
                sent, first, text = time.perf_counter(), None, []
                try:
                    for msg in client.chat_stream(messages, c.adapter_id(k % args.adapters),
                                                  max_new_tokens=args.new_tokens, ignore_eos=True):
                        first = first or time.perf_counter()
                        text.append(msg.text)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(str(exc))
                    return
                with lock:
                    ttft[turn].append(first - sent)
                messages.append(("assistant", "".join(text)))

    before = srv.metrics()
    threads = [threading.Thread(target=talk, args=(k,)) for k in range(args.conversations)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p50 = [1e3 * statistics.median(t) if t else float("nan") for t in ttft]
    return {"ttft_p50_ms_by_turn": p50, "turn5_over_turn1": c.ratio(p50[-1], p50[0]), "errors": len(errors),
            **_hits(before, srv.metrics())}


def main(argv=None) -> int:
    args = parse_args(argv)
    env = c.start(args.snapshot, args.model)
    tok = c.tokenizer()
    adapters = c.ensure_adapters(args.adapters)
    work = c.workdir("prefix")
    shared, unshared = shared_requests(tok, args, args.requests), unshared_requests(tok, args)
    # Questions not asked before: only the system prompts can be in the cache.
    idle = shared_requests(tok, args, args.idle_requests, "idle")
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}")
    print(f"model {c.MODEL_NAME} nf4, {args.adapters} adapters, {args.clients} clients, {args.requests} requests, "
          f"system prompts {args.prefix_tokens} tokens, prompts {min(r.prompt_tokens for r in shared)}-"
          f"{max(r.prompt_tokens for r in shared)} tokens, {args.new_tokens} new tokens; logs in {work}", flush=True)
    extra = tuple(args.server_args.split())
    servers: dict[str, object] = {}
    runs: dict[str, dict] = {"off": {}, "on": {}}
    try:
        for name, flags in (("off", ("--prefix-cache-bytes", "0")), ("on", ())):
            servers[name] = c.start_server(work / name, adapters, slots=32, max_batch=args.max_batch_size,
                                           max_rank=16, extra=(*flags, *extra))
            c.warm_up(servers[name].address)
        # Workload by workload, off then on: the two sides of a ratio run minutes apart, not the
        # whole script apart (this VM's speed drifts).
        for workload in ("shared", "idle", "multi_turn", "unshared"):
            for name, srv in servers.items():
                c.wait_for_quiet(args.wait_quiet)
                if workload == "multi_turn":
                    runs[name][workload] = multi_turn(srv, args)
                elif workload == "idle":  # one client: a request's own TTFT, no queue in front of it
                    runs[name][workload] = loaded(srv, idle, 1)
                else:
                    runs[name][workload] = loaded(srv, shared if workload == "shared" else unshared, args.clients)
                print(f"cache {name:>3} {workload:>10}: {_line(runs[name][workload])}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    print()
    print(report(runs))
    path = c.write_results("prefix" + ("-quick" if args.quick else ""), {"args": vars(args), "runs": runs}, env)
    print(f"\nresults: {path}")
    return 0 if all(w.get("errors", 0) == 0 for r in runs.values() for w in r.values()) else 1


def _line(r: dict) -> str:
    if "ttft_p50_ms_by_turn" in r:
        turns = " / ".join(f"{t:.0f}" for t in r["ttft_p50_ms_by_turn"])
        return f"TTFT p50 by turn {turns} ms, hit rate {r['hit_rate']:.2f}, errors {r['errors']}"
    return (f"{r['tokens_per_s']:.1f} tok/s, TTFT p50 {r['ttft_p50_ms']:.0f} ms (first wave included "
            f"{r['ttft_all_p50_ms']:.0f} ms), hit rate {r['hit_rate']:.2f}, errors {r['errors']}")


def report(runs: dict) -> str:
    off, on = runs["off"], runs["on"]
    rows, busy = [], {}
    for w in ("shared", "idle", "unshared"):
        busy[w] = c.ratio(on[w]["steady_tokens_per_s"], off[w]["steady_tokens_per_s"])
        rows.append([w, off[w]["tokens_per_s"], on[w]["tokens_per_s"],
                     c.ratio(on[w]["tokens_per_s"], off[w]["tokens_per_s"]), busy[w],
                     off[w]["ttft_p50_ms"], on[w]["ttft_p50_ms"], c.ratio(on[w]["ttft_p50_ms"], off[w]["ttft_p50_ms"]),
                     off[w]["ttft_all_p50_ms"], on[w]["ttft_all_p50_ms"], on[w]["hit_rate"]])
    # "all busy": tok/s while every client is busy (common._steady), after the first wave: the
    # cache-on side's first requests of each adapter (cold misses) are behind it.
    lines = [c.table(["workload", "off tok/s", "on tok/s", "on/off", "on/off all busy", "off TTFT p50 ms",
                      "on TTFT p50 ms", "TTFT on/off", "off TTFT p50 ms, all", "on TTFT p50 ms, all", "hit rate"],
                     rows, 2)]
    for name in ("off", "on"):
        m = runs[name]["multi_turn"]
        lines.append(f"multi-turn, cache {name}: TTFT p50 by turn "
                     f"{' / '.join(f'{t:.0f}' for t in m['ttft_p50_ms_by_turn'])} ms, "
                     f"turn 5 / turn 1 = {m['turn5_over_turn1']:.2f}")
    s, u = on["shared"], on["unshared"]
    lines.append(f"targets: shared throughput {c.ratio(s['tokens_per_s'], off['shared']['tokens_per_s']):.2f}x "
                 f"(>= 3; {busy['shared']:.2f}x while all clients are busy, the cold misses behind), "
                 f"TTFT {c.ratio(s['ttft_p50_ms'], off['shared']['ttft_p50_ms']):.2f}x (<= 0.25); "
                 f"multi-turn {on['multi_turn']['turn5_over_turn1']:.2f} (<= 1.5); "
                 f"unshared {c.ratio(u['tokens_per_s'], off['unshared']['tokens_per_s']):.2f}x (>= 0.95)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
