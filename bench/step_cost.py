"""What a prompt token and a generated token cost the engine, and the ceiling that puts on
`vs_peft`'s ratio to PEFT (a) on this machine.

In-process, wired as the server wires it (4-bit bench model, a `Runner` with 32 stacked
slots, adapters loaded through `AdapterSlots`), on one thread as each engine thread runs:
- *prefill*: the first requests of `vs_peft`'s workload prefilled one prompt per forward
  (the server averaged 1.15 prompts per prefill there), ms per prompt token;
- *decode*: `--rows` of them decoding together over `--adapters` distinct adapters (the
  server's mean batch in `vs_peft`: 20.5 rows, 9.4 adapters), ms per generated token, the
  median step after `--warm-steps` (the live window then about as wide as the server's).

The ceiling: the workload's prompt tokens and generated tokens at those costs, on every
core at once with no ramp-up, no tail, no gRPC and no scheduling, against PEFT (a)'s
tokens/s from the latest `vs_peft` results. `--profile` prints torch.profiler's op table
of the decode steps.

    python -m bench.step_cost [--rows 20] [--adapters 10] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common as c  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20, help="decode batch rows")
    p.add_argument("--adapters", type=int, default=10, help="distinct adapters among the rows")
    p.add_argument("--threads", type=int, default=1, help="torch threads (an engine thread's own team)")
    p.add_argument("--warm-steps", type=int, default=40, help="decode steps before timing")
    p.add_argument("--steps", type=int, default=60, help="timed decode steps")
    p.add_argument("--prefills", type=int, default=24, help="timed one-prompt prefills")
    p.add_argument("--requests", type=int, default=128, help="vs_peft's workload (its defaults)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler's table of decode steps")
    c.add_run_options(p)  # --wait-quiet, --snapshot
    return p.parse_args(argv)


def build(n_adapters: int):
    """Runner over the 4-bit bench model with 32 slots, `n_adapters` of them loaded."""
    runner, store, slots, _, _ = c.in_process(32, 16)  # the server's defaults
    ids = []
    for aid, folder in c.ensure_adapters(n_adapters, rank=8).items():
        store.add(store.inspect(aid, folder.resolve(), "rpc"))
        ids.append(slots.acquire(aid))
    return runner, ids


def prefill_cost(runner, prompts: list[list[int]], slots: list[int]) -> float:
    """Seconds per prompt token, one prompt per forward."""
    runner.prefill(prompts[:1], slots[:1])  # warm
    start = time.perf_counter()
    for prompt, slot in zip(prompts, slots, strict=True):
        runner.prefill([prompt], [slot])
    return (time.perf_counter() - start) / sum(map(len, prompts))


def decode_cost(runner, prompts: list[list[int]], slots: list[int], warm: int, steps: int,
                profile: bool) -> tuple[float, int]:
    """Seconds per generated token (median step / rows) and the live window's width."""
    from loramux.model.runner import merge

    batch = None
    for prompt, slot in zip(prompts, slots, strict=True):
        batch = merge(batch, runner.prefill([prompt], [slot])[1])
    tokens = [5] * len(prompts)
    for _ in range(warm):
        runner.decode(batch, tokens)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        runner.decode(batch, tokens)
        times.append(time.perf_counter() - start)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            for _ in range(10):
                runner.decode(batch, tokens)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return statistics.median(times) / len(prompts), batch.hi - batch.lo


def peft_a() -> tuple[float, int] | None:
    """PEFT (a) tokens/s and the generated tokens of the latest vs_peft run, if any."""
    path = c.RESULTS_DIR / "vs_peft-latest.json"
    if not path.exists():
        return None
    results = json.loads(path.read_text()).get("results", {})
    if "a" not in results:
        return None
    return results["a"]["tokens_per_s"], results["a"]["tokens"]


def main(argv=None) -> int:
    args = parse_args(argv)
    env = c.start(args.snapshot, args.model)
    from loramux.model.threads import set_threads

    set_threads(args.threads)
    runner, slots = build(args.adapters)
    requests = c.make_requests(args.requests, 32, "powerlaw", c.SEED, (32, 128), (32, 128))
    prompts = [runner.tokenizer(r.prompt).input_ids for r in requests]
    print(f"commit {env['commit']} ({env['server_code']}), {env['date']}; {args.threads} torch thread(s)", flush=True)
    c.wait_for_quiet(args.wait_quiet)
    per_prompt = prefill_cost(runner, prompts[:args.prefills], [slots[i % len(slots)] for i in range(args.prefills)])
    rows = prompts[:args.rows]
    per_token, width = decode_cost(runner, rows, [slots[i % len(slots)] for i in range(len(rows))],
                                   args.warm_steps, args.steps, args.profile)
    print(f"prefill: {1e3 * per_prompt:.3f} ms per prompt token (one prompt per forward)")
    print(f"decode:  {1e3 * per_token:.3f} ms per generated token ({args.rows} rows, {args.adapters} adapters, "
          f"window {width} columns)")
    prompt_tokens = sum(r.prompt_tokens for r in requests)
    peft = peft_a()
    data = {"args": vars(args), "prefill_s_per_token": per_prompt, "decode_s_per_token": per_token,
            "window": width, "prompt_tokens": prompt_tokens}
    if peft:
        peft_tps, generated = peft
        cores = os.cpu_count() or 1
        # Every request's first token comes out of its prefill; the rest are decode steps.
        core_s = prompt_tokens * per_prompt + (generated - len(requests)) * per_token
        ceiling = generated / (core_s / cores)
        data.update(peft_a_tokens_per_s=peft_tps, generated=generated, ceiling_tokens_per_s=ceiling)
        print(f"\nvs_peft's workload: {prompt_tokens} prompt tokens, {generated} generated: {core_s:.1f} core-s of "
              f"model steps; on {cores} cores with nothing else: at most {ceiling:.0f} tok/s, "
              f"{ceiling / peft_tps:.1f}x PEFT (a) ({peft_tps:.1f} tok/s in the latest vs_peft)")
    path = c.write_results("step_cost", data, env)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
