"""Measured ceilings of the targets loramux misses on this machine (issues 14 and 16): what
the model's own steps cost, so the best any scheduler could print with this model and CPU.

In-process on the served model (SmolLM2-135M NF4 by default), wired as the server wires it
(`bench.common.in_process`: 32 slots padded to rank 16, rank-8 adapters on all 7
projections), on one torch team as the engine thread runs; no gRPC, no queue, no scheduler:

(1) one client: a request of `--new-tokens` alone is one prefill and new-1 one-row decode
    forwards; against PEFT `generate` one request at a time on the same chat prompts, timed
    here too: the ceiling of "one client >= 2x PEFT".
(2) 32 adapters / one: a decode step of 32 rows (chat prompts of ~34 tokens, 32 steps in,
    as in bench.vs_llamacpp) over 32 distinct adapters, over one adapter and on the bare
    base: the ceiling of "32 adapters >= 0.85x one adapter", and the LoRA term's cost.
(3) prefix cache: one wave of bench.prefix's shared-prefix workload (32 requests over 8
    adapters, 300-token system prompts, `--new-tokens` each) at its cheapest: cache off, the
    whole prompts prefilled, one forward per length group (`Runner.prefill_parts`); cache
    on and warm, their uncached rest only; then the decode steps both share. Their ratio is
    the ceiling of "throughput >= 3x cache off" once the cache is warm; bench.prefix's run
    (96 requests) starts cold, so its ceiling also pays the 8 system prompts' first prefill
    (one forward for the 8, the cheapest way): 3 waves off against 3 waves on plus that,
    less the 8 rests it replaces. A lone request's prefill on and off bounds "TTFT <= 0.25x".
    Each side runs again and the fastest counts, glibc told to keep freed memory (`_keep_freed`):
    a first run paid this VM's fresh-page faults, which a server that has run a while does not.
(4) a wave of 32 requests sent at once (bench.vs_llamacpp's chats, every client's first
    request): whatever the schedule, the median request's first token waits for at least 16
    prompts' prefill; the best of that, one forward of 16, against one prompt alone bounds
    "loaded TTFT <= 3x idle" for waves.
(5) bench.scaling's workload (96 requests, 40-400-token prompts, answers of 16-256 tokens
    exactly, 32 closed-loop clients) replayed with free prefills: the mean decode batch no
    scheduler can beat, ramp-up and tail included ("mean decode batch >= 28").

    python -m bench.ceilings            # ~3 minutes
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402
from bench.chat_requests import QUESTIONS  # noqa: E402
from bench.step_cost import build  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per answer in (1) and (3)")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per median in (2)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds in (2); the best median counts")
    p.add_argument("--peft-requests", type=int, default=4, help="PEFT generate requests timed in (1)")
    p.add_argument("--prefix-tokens", type=int, default=300, help="system prompt tokens in (3)")
    c.add_run_options(p)
    return p.parse_args(argv)


def _keep_freed() -> None:
    """glibc's malloc told to keep freed memory for the next tensors (large blocks from its
    heap, never trimmed, one arena): a block above its mmap threshold (at most 32 MiB: a
    prefill group of 8 prompts of ~330 tokens is ~120 MB of keys and values) otherwise comes
    back as fresh pages each time, and the ceilings would count the VM's page faults (a wave
    of (3) cache on: ~357,000, 2.5-6 s) that no schedule needs."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc: measured as it comes
        return
    for param, value in ((-8, 1), (-4, 0), (-1, -1)):  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD (-1: never)
        mallopt(param, value)


def _best(runner, fn) -> float:
    """Best of 3 timed calls after a warm-up, on the runner's device: the start-up
    calibration's own timer."""
    from loramux.model.calibrate import _seconds

    return _seconds(fn, runner.device, repeat=3)


def _step(runner, batch, rows: int, steps: int) -> float:
    """Median seconds of a decode step of `batch`."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.decode(batch, [5] * rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _batch(runner, prompts: list[list[int]], slots: list[int], warm: int, pasts: list | None = None):
    """`prompts` prefilled after their cached prefixes `pasts` (if any), one length group per
    forward as the engine groups them, merged into one batch, then decoded `warm` steps."""
    from loramux.model.runner import merge

    pasts, batch = pasts or [None] * len(prompts), None
    rest = [len(p) - (0 if q is None else q.shape[3]) for p, q in zip(prompts, pasts, strict=True)]
    for part in runner.prefill_parts(rest):
        _, group = runner.prefill([prompts[i] for i in part], [slots[i] for i in part], [pasts[i] for i in part])
        batch = merge(batch, group, len(prompts))
    for _ in range(warm):
        runner.decode(batch, [5] * len(prompts))
    return batch


def chat_prompts(tok, n: int) -> list[list[int]]:
    return [tok(tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                        add_generation_prompt=True, tokenize=False)).input_ids for i in range(n)]


def one_client(runner, slot: int, adapter: str, folder: Path, tok, args) -> dict:
    """(1): loramux's floor per request against PEFT generate on the same prompts."""
    from bench.peft_ref import load_peft

    prompts = chat_prompts(tok, args.peft_requests)
    prefill = statistics.mean(_best(runner, lambda p=p: runner.prefill([p], [slot])) for p in prompts)
    batch = _batch(runner, prompts[:1], [slot], 4)
    step = _step(runner, batch, 1, args.steps)
    floor = args.new_tokens / (prefill + (args.new_tokens - 1) * step)
    model, _ = load_peft(c.bench_model(), {adapter: folder})
    import torch

    model.set_adapter(adapter)
    with torch.inference_mode():
        ids = [torch.tensor([p]) for p in prompts]
        model.generate(input_ids=ids[0], max_new_tokens=4, do_sample=False)  # warm
        start = time.perf_counter()
        for x in ids:
            model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        peft = len(ids) * args.new_tokens / (time.perf_counter() - start)
    del model
    return {"prefill_ms": 1e3 * prefill, "step_ms": 1e3 * step, "floor_tokens_per_s": floor,
            "peft_tokens_per_s": peft, "ceiling_x_peft": floor / peft}


def adapters_step(runner, slots: list[int], tok, args) -> dict:
    """(2): one decode step of 32 rows on 32 adapters, one adapter, the bare base."""
    prompts = chat_prompts(tok, 32)
    ways = {"bare base": [-1] * 32, "one adapter": [slots[0]] * 32, "32 adapters": slots[:32]}
    batches = {name: _batch(runner, prompts, row_slots, args.new_tokens) for name, row_slots in ways.items()}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):  # interleaved: this VM's speed drifts within a minute
        for name, batch in batches.items():
            times[name].append(_step(runner, batch, 32, args.steps))
    out = {name: 1e3 * min(t) for name, t in times.items()}
    layers = runner.layers.values()
    out["slot_mib_read_per_step_32"] = 32 * sum(8 * (m.in_features + m.out_features) * 4 for m in layers) / 2**20
    out["ceiling_32_over_one"] = out["one adapter"] / out["32 adapters"]
    return out


def prefix_wave(runner, slots: list[int], tok, metrics, args) -> dict:
    """(3): one wave of the shared-prefix workload, cache off and warm cache on."""
    from bench import prefix as P
    from loramux.model.prefix import PrefixCache

    spec = argparse.Namespace(adapters=8, prefix_tokens=args.prefix_tokens, seed=c.SEED, new_tokens=args.new_tokens)
    reqs = P.shared_requests(tok, spec, 32, "ceiling")
    prompts = [tok(r.prompt).input_ids for r in reqs]
    row_slots = [slots[int(r.adapter_id[1:])] for r in reqs]  # "a003": adapter 3
    cache = PrefixCache(4 << 30, metrics)
    first = {s: p for p, s in reversed(list(zip(prompts, row_slots, strict=True)))}  # each adapter's first
    cold = math.inf  # the cold cache's misses: every system prompt prefilled once (the faster of two)
    for _ in range(2):
        started = time.perf_counter()
        _, group = runner.prefill(list(first.values()), list(first))
        cold = min(cold, time.perf_counter() - started)
    for i, (s, p) in enumerate(first.items()):
        cache.insert(str(s), str(s), p, runner.row_kv(group, i, len(p)))
    steps = args.new_tokens - 1  # the first token comes out of the prefill

    def wave(pasts) -> tuple[float, float]:
        start = time.perf_counter()
        batch = _batch(runner, prompts, row_slots, 0, pasts)
        prefilled = time.perf_counter()
        for _ in range(steps):
            runner.decode(batch, [5] * 32)
        return prefilled - start, time.perf_counter() - prefilled

    def on_wave() -> tuple[float, float, list]:
        """`wave` after looking up every prompt's cached prefix: (lookups + prefill, decode, pasts)."""
        start = time.perf_counter()
        pasts = [cache.lookup(str(s), p) for p, s in zip(prompts, row_slots, strict=True)]
        lookup = time.perf_counter() - start
        prefill, decode = wave(pasts)
        return lookup + prefill, decode, pasts

    # Each side again, the fastest kept: a first run pays for its buffers' fresh pages (a fault
    # per 4 KiB on this VM; the cache-on side's joins ~1,000 MB of them), which a process that
    # has run a while has at hand (`_keep_freed`).
    off = min((wave([None] * 32) for _ in range(2)), key=sum)
    *on, pasts = min((on_wave() for _ in range(3)), key=lambda r: r[0] + r[1])
    tokens = 32 * args.new_tokens
    p0, s0, q0 = prompts[0], row_slots[0], pasts[0]
    ttft_off = _best(runner, lambda: runner.prefill([p0], [s0]))
    ttft_on = _best(runner, lambda: runner.prefill([p0], [s0], [cache.lookup(str(s0), p0)]))
    waves = P.parse_args([]).requests // len(prompts)  # bench.prefix's run: 3 waves
    cold_run = waves * sum(on) + cold - len(first) / len(prompts) * on[0]
    return {"prompt_tokens": sum(map(len, prompts)), "cached_tokens": sum(q.shape[3] for q in pasts),
            "cold_prefill_s": cold, "ceiling_cold_run": waves * sum(off) / cold_run,
            "off_prefill_s": off[0], "on_prefill_s": on[0], "off_decode_s": off[1], "on_decode_s": on[1],
            "off_tokens_per_s": tokens / sum(off), "on_tokens_per_s": tokens / sum(on),
            "ceiling_on_over_off": sum(off) / sum(on), "lone_ttft_off_ms": 1e3 * ttft_off,
            "lone_ttft_on_ms": 1e3 * ttft_on, "lone_ttft_ratio": ttft_on / ttft_off,
            "hit_rest_tokens": len(p0) - q0.shape[3]}


def wave_ttft(runner, tok) -> dict:
    """(4): 16 chat prompts in one forward against one alone."""
    prompts = chat_prompts(tok, 16)
    half = _best(runner, lambda: runner.prefill(prompts, [-1] * 16))
    one = statistics.median(_best(runner, lambda p=p: runner.prefill([p], [-1])) for p in prompts[:4])
    return {"prefill_16_ms": 1e3 * half, "prefill_1_ms": 1e3 * one, "floor_loaded_over_idle": half / one}


def decode_batch_ceiling(clients: int = 32, requests: int = 96) -> dict:
    """(5): bench.scaling's closed loop with prefill taking no time: rows per decode step."""
    reqs = c.make_requests(requests, 32, "uniform", c.SEED, *c.ranges(None, None), ignore_eos=True)
    waiting = [r.max_new_tokens - 1 for r in reqs]  # decode steps each needs (its first token: prefill)
    running, steps, rows = [], 0, 0
    while waiting or running:
        while waiting and len(running) < clients:  # a client sends its next request at once
            running.append(waiting.pop(0))
        running = [n for n in running if n > 0]
        if running:
            steps, rows = steps + 1, rows + len(running)
            running = [n - 1 for n in running]
    return {"mean_rows_per_step": rows / steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    _keep_freed()
    env = c.start(args.snapshot, args.model)
    from loramux.metrics import Metrics
    from loramux.model.threads import set_threads

    set_threads(0)  # every core, as the engine thread
    runner, slots = build(32)  # 32 slots padded to rank 16, 32 rank-8 adapters loaded
    adapters, metrics, tok = c.ensure_adapters(32, log=False), Metrics(), runner.tokenizer
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}; model {c.MODEL_NAME} nf4", flush=True)
    c.wait_for_quiet(args.wait_quiet)
    res = {"adapters": adapters_step(runner, slots, tok, args)}
    a = res["adapters"]
    print(f"(2) decode step, 32 rows, ~{34 + args.new_tokens} tokens of context: bare base {a['bare base']:.0f} ms, "
          f"one adapter {a['one adapter']:.0f} ms, 32 adapters {a['32 adapters']:.0f} ms "
          f"({a['slot_mib_read_per_step_32']:.0f} MiB of slot weights read): "
          f"32 / one at most {a['ceiling_32_over_one']:.2f}x (target 0.85)", flush=True)
    res["prefix"] = p = prefix_wave(runner, slots, tok, metrics, args)
    print(f"(3) a wave of 32 shared-prefix requests ({p['prompt_tokens']} prompt tokens, {p['cached_tokens']} cached): "
          f"cache off {p['off_prefill_s']:.1f} s prefill + {p['off_decode_s']:.1f} s decode = "
          f"{p['off_tokens_per_s']:.0f} tok/s; on {p['on_prefill_s']:.1f} s + {p['on_decode_s']:.1f} s = "
          f"{p['on_tokens_per_s']:.0f} tok/s: on / off at most {p['ceiling_on_over_off']:.2f}x warm, "
          f"{p['ceiling_cold_run']:.2f}x for bench.prefix's run from a cold cache (8 system prompts "
          f"{p['cold_prefill_s']:.1f} s; target 3); "
          f"a lone request's prefill {p['lone_ttft_off_ms']:.0f} -> {p['lone_ttft_on_ms']:.0f} ms "
          f"({p['lone_ttft_ratio']:.2f}x; {p['hit_rest_tokens']} tokens not cached), TTFT target 0.25x", flush=True)
    res["wave"] = w = wave_ttft(runner, tok)
    print(f"(4) a wave of 32 chats at once: 16 prompts prefilled in one forward {w['prefill_16_ms']:.0f} ms, one "
          f"alone {w['prefill_1_ms']:.0f} ms: the median request's TTFT is at least "
          f"{w['floor_loaded_over_idle']:.1f}x a lone one's (target 3x idle)", flush=True)
    res["scaling_batch"] = b = decode_batch_ceiling()
    print(f"(5) bench.scaling's workload with free prefills: at most {b['mean_rows_per_step']:.1f} rows per decode "
          "step (target 28)", flush=True)
    aid = next(iter(adapters))
    res["one_client"] = o = one_client(runner, slots[0], aid, adapters[aid], tok, args)
    print(f"(1) one client, {args.new_tokens} new tokens: prefill {o['prefill_ms']:.0f} ms + one-row step "
          f"{o['step_ms']:.0f} ms: at most {o['floor_tokens_per_s']:.1f} tok/s; PEFT generate "
          f"{o['peft_tokens_per_s']:.1f} tok/s: at most {o['ceiling_x_peft']:.2f}x (target 2)", flush=True)
    path = c.write_results("ceilings", {"args": vars(args), **res}, env)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
