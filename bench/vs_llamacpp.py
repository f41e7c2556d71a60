"""loramux against llama.cpp's own server on the same model, adapters and chat requests.

llama-server (built once from the llama.cpp source vendored in the llama-cpp-python sdist,
`bench.llamacpp`) serves the Q4_1 GGUF file that loramux's SmolLM2-135M-Instruct is converted
from, with the same random rank-8 PEFT adapters (all 7 projections) converted to LoRA GGUFs
and loaded at scale 0, each request choosing its own (`"lora": [{"id": i, "scale": 1}]`).
loramux serves the same model in NF4 (its default) through a real server. Both get the same
prompt strings (a system prompt and a question rendered with the model's chat template),
greedy, EOS ignored, the same number of new tokens, from the same number of closed-loop
streaming clients (HTTP server-sent events for llama-server, gRPC for loramux). Neither
reuses prompts (llama-server `--no-cache-prompt`, loramux `--prefix-cache-bytes 0`): the same
work on both; `--prefix-cache` runs loramux with its prefix cache (bench.prefix measures it).

Three scenarios on each server: the bare base, one adapter for every request, and N adapters
(request i -> adapter i % N). Only one server runs at a time; `--rounds` alternates them
(llama.cpp, loramux, llama.cpp, loramux) so that the machine's drift weighs on both.
`--quantizations nf4,none` (the default) also runs loramux on the float32 base each round:
the 4-bit tax. `--peft-check N` generates the first N requests of each scenario with PEFT
(one at a time, in-process, after the rounds) and counts loramux's answers equal to them.

    python -m bench.vs_llamacpp              # 96 requests, 32 clients, 32 adapters, 2 rounds
    python -m bench.vs_llamacpp --quick      # smoke run: 8 requests, 8 clients, 2 adapters
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
import signal
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import chat_requests as chat  # noqa: E402
from bench import common as c  # noqa: E402
from bench import llamacpp  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def loramux_name(quantization: str) -> str:
    return "loramux" if quantization == "nf4" else f"loramux {quantization}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=96, help="requests per scenario")
    p.add_argument("--clients", type=int, default=32, help="closed-loop streaming clients (llama-server: --parallel)")
    p.add_argument("--adapters", type=int, default=32, help="adapters of the many-adapter scenario")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-tokens", default="30,38", help="min,max prompt tokens (chat template included)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (EOS ignored)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, each llama.cpp then loramux")
    p.add_argument("--scenarios", default="base,one,many", help="comma-separated: base, one, many")
    p.add_argument("--seed", type=int, default=c.SEED)
    p.add_argument("--threads", type=int, default=0, help="llama-server threads (0: one per core)")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16"], help="LoRA GGUF tensor type")
    p.add_argument("--slots", type=int, default=None, help="loramux device slots (default: max(adapters, clients))")
    p.add_argument("--max-batch-size", type=int, default=32, help="loramux --max-batch-size")
    p.add_argument("--server-args", default="", help="more flags for the loramux server")
    p.add_argument("--prefix-cache", action="store_true",
                   help="run loramux with its prefix cache (its default; off here unless given, as llama-server "
                   "runs with --no-cache-prompt, so that both servers do the same work)")
    p.add_argument("--quantizations", default="nf4,none",
                   help="loramux servers to run each round, by --quantization (nf4 first: the one compared)")
    p.add_argument("--peft-check", type=int, default=4,
                   help="requests per scenario whose loramux (nf4) answers are checked against PEFT (0: none)")
    p.add_argument("--llama-args", default="", help="more flags for llama-server")
    p.add_argument("--llama-build", default="native", choices=["native", "avx2"],
                   help="llama-server build: -march=native (llama.cpp's default) or AVX2 named explicitly")
    c.add_run_options(p)  # --model (one built from a GGUF file), --wait-quiet, --snapshot
    p.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 8 clients, 2 adapters, "
                   "16 new tokens, one round")
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.clients, args.adapters, args.new_tokens, args.rounds = 8, 8, 2, 16, 1
        args.peft_check = 1
    args.quantizations = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    args.servers = ["llama.cpp", *map(loramux_name, args.quantizations)]
    args.slots = args.slots or max(args.adapters, args.clients)
    return args


def scenarios(args, adapter_ids: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{key: (label, adapters cycled over the requests)}."""
    known = {"base": ("bare base", []), "one": ("1 adapter", adapter_ids[:1]),
             "many": (f"{len(adapter_ids)} adapters", adapter_ids)}
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in known]:
        raise SystemExit(f"unknown scenario(s) {unknown}: choose from {list(known)}")
    return {k: known[k] for k in keys}


def main(argv=None) -> int:
    args = parse_args(argv)
    # A SIGTERM'd run exits through its `finally`s, which stop the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    env = c.start(args.snapshot, args.model)
    from loramux.model.gguf import GGUF_MODELS

    if c.MODEL_NAME not in GGUF_MODELS:  # llama-server needs the GGUF file loramux's model comes from
        raise SystemExit(f"--model {c.MODEL_NAME}: vs_llamacpp runs only models built from a GGUF file "
                         f"({', '.join(GGUF_MODELS)})")
    binary = llamacpp.ensure_server(build=args.llama_build)
    model_gguf = llamacpp.ensure_model_gguf(c.MODEL_NAME)
    base = c.bench_model()
    adapters = c.ensure_adapters(args.adapters, rank=args.rank, targets=ALL_TARGETS)
    print(f"converting {len(adapters)} adapters to LoRA GGUF ({args.outtype}; cached next to them)", flush=True)
    loras = {aid: llamacpp.convert_adapter(folder, base, args.outtype) for aid, folder in adapters.items()}

    tokenizer = chat.load_tokenizer(base)
    pool = chat.PromptPool(tokenizer)
    plan = scenarios(args, list(adapters))
    requests = {k: chat.make_chat_requests(tokenizer, args.requests, ids, args.seed,
                                           c.int_range(args.prompt_tokens), (args.new_tokens, args.new_tokens),
                                           pool=pool) for k, (_, ids) in plan.items()}
    first = next(iter(requests.values()))
    lengths = [r.prompt_tokens for r in first]
    work = c.workdir("vs_llamacpp" + ("-quick" if args.quick else ""))
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}")
    print(f"model {c.MODEL_NAME}: llama.cpp {model_gguf.name} ({llamacpp.PACKAGE} {llamacpp.VERSION}'s llama.cpp), "
          f"loramux nf4 (float32 compute); {args.adapters} rank-{args.rank} adapters on {len(ALL_TARGETS)} "
          f"projections; {args.requests} chat requests per scenario, prompts {min(lengths)}-{max(lengths)} tokens "
          f"(mean {statistics.mean(lengths):.1f}), {args.new_tokens} new tokens, greedy, EOS ignored; "
          f"{args.clients} clients; prompt reuse: {'loramux only' if args.prefix_cache else 'neither server'}; "
          f"logs in {work}", flush=True)

    runs: list[dict] = []
    checks: dict = {}
    for r in range(1, args.rounds + 1):
        runs += run_llamacpp(args, binary, model_gguf, loras, requests, plan, work / f"llamacpp-{r}", r, checks,
                             tokenizer)
        for q in args.quantizations:
            runs += run_loramux(args, adapters, requests, plan, work / f"{loramux_name(q).replace(' ', '-')}-{r}", r,
                                q)

    rows = summarize(runs, plan, args.servers)
    parity = compare(runs, plan, tokenizer, args.servers)
    if args.peft_check:
        parity["peft"] = check_peft(runs, plan, requests, adapters, args.peft_check)
    print()
    print(report(rows, runs, plan, parity, checks, args))
    data = {"args": vars(args), "model_gguf": model_gguf, "llama_server": binary, "checks": checks,
            "rows": rows, "parity": parity, "prompt_tokens": lengths,
            "runs": [{k: v for k, v in run.items() if k != "answers"} for run in runs]}
    path = c.write_results("vs_llamacpp" + ("-quick" if args.quick else ""), data, env)
    print(f"\nresults: {path}")
    return 0 if all(run["errors"] == 0 for run in runs) else 1


# --- the two servers ---------------------------------------------------------------------
def run_llamacpp(args, binary: Path, model_gguf: Path, loras: dict[str, Path], requests: dict, plan: dict,
                 work: Path, round_no: int, checks: dict, tokenizer) -> list[dict]:
    """One llama-server with every adapter loaded at scale 0, every scenario on it."""
    longest = max(r.prompt_tokens + r.max_new_tokens for reqs in requests.values() for r in reqs)
    ctx = 64 * math.ceil((longest + 32) / 64)  # per slot; no prompt exceeds it even if tokenized longer
    srv = llamacpp.start_server(binary, model_gguf, work, loras=list(loras.values()), threads=args.threads,
                                parallel=args.clients, ctx_per_slot=ctx, extra=shlex.split(args.llama_args))
    checks.setdefault("llama_server_command", srv.cmd)
    try:
        index = _lora_index(srv, loras)
        if round_no == 1:
            checks.update(check_tokens(srv, tokenizer, requests))
        lora_of = {aid: [{"id": i, "scale": 1.0}] for aid, i in index.items()}

        def body(req: c.BenchRequest) -> dict:
            return llamacpp.completion_body(req, lora_of.get(req.adapter_id))

        warm = [dataclasses.replace(q, max_new_tokens=8) for q in list(requests.values())[-1][:4]]
        llamacpp.run_http_load(srv, warm, 2, body)
        out = []
        for key, (label, _) in plan.items():
            c.wait_for_quiet(args.wait_quiet)
            probe = c.machine_probe()
            before, drained = srv.metrics(), []
            res = llamacpp.run_http_load(srv, requests[key], args.clients, body,
                                         on_drained=lambda got=drained: got.append(srv.metrics()))
            probe = (probe + c.machine_probe()) / 2
            stats = _llama_stats(before, srv.metrics())
            busy = _llama_stats(before, drained[0])["busy_slots_per_call"] if drained else math.nan
            evaluated = {o.index: o.prompt_n for o in res.outcomes}
            same = sum(evaluated.get(q.index) == q.prompt_tokens for q in requests[key])
            out.append(_record("llama.cpp", key, label, round_no, res, stats, prompt_n_equal=same, probe=probe,
                               rows_per_call_busy=busy))
    finally:
        srv.stop()
    return out


def _lora_index(srv: llamacpp.LlamaServer, loras: dict[str, Path]) -> dict[str, int]:
    """{adapter id: llama-server's LoRA id}, from GET /lora-adapters (all must be there, at scale 0).

    In this llama.cpp `--lora-init-without-apply` leaves every adapter's global scale at 1
    (it only skips applying them at start-up), and a request without a `lora` field runs
    with the global scales: a bare-base request would get all adapters at once. So the
    global scales are set to 0 here (POST /lora-adapters) and checked."""
    srv.post_json("/lora-adapters", [{"id": a["id"], "scale": 0.0} for a in srv.lora_adapters()])
    listed = srv.lora_adapters()
    by_path = {Path(a["path"]).resolve(): a for a in listed}
    index = {}
    for aid, path in loras.items():
        entry = by_path.get(path.resolve())
        if entry is None or entry.get("scale", 0) != 0:
            raise RuntimeError(f"llama-server did not load {path} at scale 0: /lora-adapters = {listed}")
        index[aid] = entry["id"]
    return index


def check_tokens(srv: llamacpp.LlamaServer, tokenizer, requests: dict) -> dict:
    """Do both servers see the same prompt ids? loramux tokenizes with the HF tokenizer
    (`tokenizer(prompt)`); llama-server's /tokenize with /completion's rules (BOS only if the
    GGUF asks for one)."""
    prompts = sorted({r.prompt for reqs in requests.values() for r in reqs})
    hf = [tokenizer(p).input_ids for p in prompts]
    ll = [srv.tokenize(p) for p in prompts]
    same = sum(a == b for a, b in zip(hf, ll, strict=True))
    bos = tokenizer.bos_token_id
    return {"distinct_prompts": len(prompts), "same_ids": same,
            "loramux_tokens_mean": statistics.mean(map(len, hf)), "llamacpp_tokens_mean": statistics.mean(map(len, ll)),
            "loramux_tokens_total": sum(map(len, hf)), "llamacpp_tokens_total": sum(map(len, ll)),
            "llamacpp_leading_bos": sum(1 for ids in ll if len(ids) > 1 and ids[0] == bos and ids[1] == bos)}


def _llama_stats(before: dict[str, float], after: dict[str, float]) -> dict:
    """llama_decode() calls in the run and the mean busy slots per call (its gauge is a mean
    since start: recovered from both scrapes)."""
    calls = after.get("llamacpp:n_decode_total", math.nan) - before.get("llamacpp:n_decode_total", math.nan)
    busy = (after.get("llamacpp:n_busy_slots_per_decode", math.nan) * after.get("llamacpp:n_decode_total", math.nan)
            - before.get("llamacpp:n_busy_slots_per_decode", math.nan)
            * before.get("llamacpp:n_decode_total", math.nan))
    return {"decode_calls": calls, "busy_slots_per_call": c.ratio(busy, calls)}


def run_loramux(args, adapters: dict[str, Path], requests: dict, plan: dict, work: Path, round_no: int,
                quantization: str = "nf4") -> list[dict]:
    """One loramux server with every adapter registered, every scenario on it."""
    # No prompt reuse unless asked, as llama-server runs: with reuse, one adapter's requests share
    # the chat template's system prompt while 32 adapters' cannot across adapters (issue 16), so
    # "32 adapters / one" measured the cache, not the LoRA term (bench/README.md, stop 37).
    reuse = () if args.prefix_cache else ("--prefix-cache-bytes", "0")
    srv = c.start_server(work, adapters, slots=args.slots, max_batch=args.max_batch_size, max_rank=args.rank,
                         extra=("--quantization", quantization, *reuse, *shlex.split(args.server_args)))
    try:
        c.warm_up(srv.address)
        out = []
        for key, (label, _) in plan.items():
            c.wait_for_quiet(args.wait_quiet)
            probe = c.machine_probe()
            res, stats = c.measured_load(srv, requests[key], args.clients)
            probe = (probe + c.machine_probe()) / 2
            out.append(_record(loramux_name(quantization), key, label, round_no, res,
                               {"decode_calls": stats["decode_steps"], **stats}, probe=probe,
                               rows_per_call_busy=stats["batch_size_busy"]))
    finally:
        srv.stop()
    return out


def _record(server: str, key: str, label: str, round_no: int, res: c.LoadResult, stats: dict, **more) -> dict:
    warm = res.requests > res.concurrency  # as common.summarize: the first wave is left out of latencies
    steady = [o for o in res.outcomes if not o.error and (not warm or o.index >= res.concurrency)]
    rec = {"server": server, "scenario": key, "label": label, "round": round_no, **res.summary(), **stats,
           "ttft_p90_ms": 1e3 * c.percentile([o.ttft for o in steady], 90),
           "tokens_per_call": c.ratio(res.tokens, stats.get("decode_calls", math.nan)),
           "answers": [o.token_ids for o in sorted(res.outcomes, key=lambda o: o.index)], **more}
    print(f"  round {round_no} {server:9s} {label:12s}: {res.tokens_per_s:6.1f} tok/s, TTFT p50 "
          f"{res.ttft_p50_ms:6.0f} ms, {res.tokens} tokens in {res.wall_s:.1f} s, errors {res.errors}, "
          f"busy cores {c.fmt(res.foreign_cpu, 2)}", flush=True)
    return rec


# --- figures -----------------------------------------------------------------------------
def summarize(runs: list[dict], plan: dict, servers: list[str]) -> list[dict]:
    """One row per (scenario, server): means over the rounds, each round's tok/s kept."""
    rows = []
    for key, (label, _) in plan.items():
        for server in servers:
            mine = [r for r in runs if r["scenario"] == key and r["server"] == server]
            if not mine:
                continue
            rates, probes = [r["tokens_per_s"] for r in mine], [r["probe"] for r in mine]
            mean = {f: statistics.mean(r[f] for r in mine) for f in (
                "tokens_per_s", "steady_tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "tpot_p50_ms",
                "tokens_per_call", "rows_per_call_busy", "foreign_cpu")}
            rows.append({"scenario": key, "label": label, "server": server, "rounds": len(mine), **mean,
                         "tokens_per_s_runs": rates, "spread": (max(rates) - min(rates)) / mean["tokens_per_s"],
                         "machine_spread": (max(probes) - min(probes)) / statistics.mean(probes),
                         "errors": sum(r["errors"] for r in mine)})
    return rows


def compare(runs: list[dict], plan: dict, tokenizer, servers: list[str]) -> dict:
    """Greedy answers of round 1: loramux against llama.cpp per scenario (they differ: Q4_1
    against NF4 of its float weights), and each adapter scenario against the bare base on the
    same server (an adapter that did not load would answer like the base)."""
    eos = tokenizer.eos_token_id
    first = {(r["server"], r["scenario"]): r["answers"] for r in runs if r["round"] == 1}
    out: dict = {"servers": {}, "vs_base": {}}
    for key in plan:
        a, b = first.get(("loramux", key)), first.get(("llama.cpp", key))
        if a and b:
            out["servers"][key] = _agreement(a, b, eos)
    for server in servers:
        for key in plan:
            if key != "base" and (server, "base") in first and (server, key) in first:
                base, other = first[(server, "base")], first[(server, key)]
                out["vs_base"][f"{server} {key}"] = sum(x != y for x, y in zip(other, base, strict=True)) / len(base)
    return out


def check_peft(runs: list[dict], plan: dict, requests: dict, adapters: dict[str, Path], n: int) -> dict:
    """PEFT's greedy answers to the first `n` requests of each scenario against loramux's
    (nf4, round 1): the correctness oracle, in every run."""
    from bench import peft_ref

    first = {r["scenario"]: r["answers"] for r in runs if r["server"] == "loramux" and r["round"] == 1}
    print(f"PEFT check: {n} requests per scenario, one at a time", flush=True)
    model, tokenizer = peft_ref.load_peft(c.bench_model(), adapters)
    return {key: peft_ref.parity(model, tokenizer, requests[key][:n], first[key][:n])
            for key in plan if key in first}


def _agreement(a: list[list[int]], b: list[list[int]], eos: int) -> dict:
    """Share of identical answers, of answers identical up to loramux's first EOS (with
    ignore_eos loramux goes on past an EOS; llama.cpp bans EOS instead), and the mean number
    of tokens equal before the first difference."""
    def until_eos(ids: list[int]) -> list[int]:
        return ids[:ids.index(eos)] if eos in ids else ids

    same = sum(x == y for x, y in zip(a, b, strict=True))
    same_eos = sum(until_eos(x) == y[:len(until_eos(x))] for x, y in zip(a, b, strict=True))
    prefix = [next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))
              for x, y in zip(a, b, strict=True)]
    return {"identical": same / len(a), "identical_until_eos": same_eos / len(a),
            "equal_prefix_tokens": statistics.mean(prefix), "answers": len(a)}


def report(rows: list[dict], runs: list[dict], plan: dict, parity: dict, checks: dict, args) -> str:
    # machine spread: `common.machine_probe` beside each run, across the rounds
    headers = ["scenario", "server", "tok/s", "tok/s runs", "spread", "machine spread", "all busy", "TTFT p50 ms",
               "TTFT p90 ms", "TPOT p50 ms", "tok/decode call", "rows/call all busy", "errors", "busy cores"]
    table = [[r["label"], r["server"], r["tokens_per_s"], "/".join(f"{x:.0f}" for x in r["tokens_per_s_runs"]),
              f"{100 * r['spread']:.0f}%", f"{100 * r['machine_spread']:.0f}%", r["steady_tokens_per_s"],
              r["ttft_p50_ms"], r["ttft_p90_ms"], r["tpot_p50_ms"], r["tokens_per_call"], r["rows_per_call_busy"],
              r["errors"], c.fmt(r["foreign_cpu"], 2)] for r in rows]
    lines = [c.table(headers, table), ""]
    by = {(r["scenario"], r["server"]): r for r in rows}
    for key, (label, _) in plan.items():
        lx, ll = by.get((key, "loramux")), by.get((key, "llama.cpp"))
        if lx and ll:
            lines.append(f"{label:>12}: loramux / llama.cpp tok/s "
                         f"{c.ratio(lx['tokens_per_s'], ll['tokens_per_s']):.2f}x, "
                         f"TTFT p50 {c.ratio(lx['ttft_p50_ms'], ll['ttft_p50_ms']):.2f}x")
    many = plan.get("many", ("N adapters",))[0]
    for server in args.servers:
        base, one, n = by.get(("base", server)), by.get(("one", server)), by.get(("many", server))
        parts = []
        if base and one:
            parts.append(f"1 adapter / bare base {c.ratio(one['tokens_per_s'], base['tokens_per_s']):.2f}x")
        if one and n:
            parts.append(f"{many} / 1 adapter {c.ratio(n['tokens_per_s'], one['tokens_per_s']):.2f}x")
        if parts:
            lines.append(f"{server:>12}: tok/s " + ", ".join(parts))
    busy = [f"{r['label']} {r['rows_per_call_busy']:.1f}" for r in rows if r["server"] == "loramux"]
    if busy:  # the first wave's ramp counts, the drain after the last request is sent does not
        lines.append("loramux mean decode batch while every client had a request in flight (>= 28): "
                     + ", ".join(busy))
    for q in args.quantizations[1:]:
        pairs = [(label, by.get((key, "loramux")), by.get((key, loramux_name(q)))) for key, (label, _) in plan.items()]
        ratios = [f"{label} {c.ratio(a['tokens_per_s'], b['tokens_per_s']):.2f}x" for label, a, b in pairs if a and b]
        lines.append(f"loramux nf4 / {q} tok/s: " + ", ".join(ratios))
    for key, got in parity.get("peft", {}).items():
        lines.append(f"greedy answers, loramux vs PEFT, {plan[key][0]}: {got['identical']}/{got['checked']} "
                     "identical (up to the first EOS)")
    evaluated = [r for r in runs if "prompt_n_equal" in r]
    if evaluated:
        lines.append(f"llama-server evaluated as many prompt tokens as the HF tokenizer counts in "
                     f"{sum(r['prompt_n_equal'] for r in evaluated)}/{sum(r['requests'] for r in evaluated)} requests")
    if checks:
        lines.append(f"prompt tokens: loramux (HF tokenizer) {checks['loramux_tokens_mean']:.1f}, llama-server "
                     f"/tokenize {checks['llamacpp_tokens_mean']:.1f} on average; identical ids in "
                     f"{checks['same_ids']}/{checks['distinct_prompts']} distinct prompts; double BOS "
                     f"{checks['llamacpp_leading_bos']}")
    for key, agree in parity["servers"].items():
        lines.append(f"greedy answers, loramux vs llama.cpp, {plan[key][0]}: identical "
                     f"{100 * agree['identical']:.0f}%, "
                     f"identical up to loramux's first EOS {100 * agree['identical_until_eos']:.0f}%, "
                     f"{agree['equal_prefix_tokens']:.1f} equal tokens before the first difference (of "
                     f"{args.new_tokens}; Q4_1 against NF4: not expected to match)")
    for name, share in parity["vs_base"].items():
        lines.append(f"answers that differ from the bare base's, {name}: {100 * share:.0f}% (the adapter is applied)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
