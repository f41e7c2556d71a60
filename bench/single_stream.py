"""One client alone: loramux's tokens/s for one request at a time, against PEFT `generate`.

The same chat questions (64 new tokens each, greedy, EOS ignored) go one after another to a
loramux server and to PEFT's `generate` on the same NF4 base with the same adapter (a demo
adapter of adapters/, or the bare base with --adapter ""). Prints both rates, the ratio, the
server's time to first token, and whether the greedy tokens are equal.

    python -m bench.single_stream                          # SmolLM2, adapters/uppercase
    python -m bench.single_stream --adapter "" --requests 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import bench.common as c

QUESTIONS = ["What is the capital of France?", "Why do we need sleep?", "Describe a forest in one sentence.",
             "Give me a tip for studying.", "What do bees make?", "How do birds fly?",
             "Tell me a fun fact about the Moon.", "What is a volcano?"]


def prompts(tokenizer, n: int) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in QUESTIONS[:n]]


def run_loramux(model: Path, adapter: str, texts: list[str], new: int, work: Path,
                kernel: str = "fused") -> tuple[float, list, list]:
    from tests.server import ServerProcess

    srv = ServerProcess(work, "--model", str(model), "--adapter-dir", str(c.REPO / "adapters"),
                        "--adapter-scan-interval", "0", "--log-level", "WARNING", "--cpu-4bit-kernel", kernel,
                        env=c.server_env())
    try:
        with srv.client() as client:
            client.generate(texts[0], adapter, max_new_tokens=4)  # warm
            tokens, ttfts, started = [], [], time.perf_counter()
            for text in texts:
                sent = time.perf_counter()
                ids = []
                for msg in client.stream(text, adapter, max_new_tokens=new, ignore_eos=True):
                    if not ids:
                        ttfts.append(time.perf_counter() - sent)
                    ids += msg.token_ids
                tokens.append(ids)
            return time.perf_counter() - started, tokens, ttfts
    finally:
        srv.stop()


def run_peft(model: Path, adapter: str, texts: list[str], new: int) -> tuple[float, list]:
    from tests.reference import PeftReference

    if adapter:
        ref = PeftReference(model, {adapter: c.REPO / "adapters" / adapter})
    else:  # the bare base of any model: a random adapter of its own shape, disabled
        from tests.adapters import make_adapter

        ref = PeftReference(model, {"random": make_adapter(model, c.workdir("single_stream") / "random")})
    ref.generate(adapter, texts[0], 4)  # warm
    started = time.perf_counter()
    out = [ref.generate(adapter, text, new, min_new_tokens=new) for text in texts]
    return time.perf_counter() - started, out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--adapter", default="uppercase", help="a folder name in adapters/ ('' for the bare base)")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--peft-threads", type=int, default=0, help="torch threads for PEFT (0: torch's default)")
    p.add_argument("--dequantize-too", action="store_true",
                   help="also run loramux with --cpu-4bit-kernel dequantize (bitsandbytes' way), after the first")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= len(QUESTIONS):  # distinct prompts: PeftReference memoises answers
        p.error(f"--requests must be in [1, {len(QUESTIONS)}]")
    c.set_model(args.model)
    model = c.bench_model()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = prompts(tokenizer, args.requests)
    eos = {tokenizer.eos_token_id}
    print(f"commit {c.git_commit()}, model {args.model} nf4, adapter {args.adapter or '(base)'}, "
          f"{args.requests} requests one at a time, {args.new_tokens} new tokens, greedy", flush=True)
    wall, lx, ttfts = run_loramux(model, args.adapter, texts, args.new_tokens, c.workdir("single_stream"))
    lx_rate = sum(map(len, lx)) / wall
    print(f"loramux: {lx_rate:.1f} tok/s, TTFT p50 {1000 * c.percentile(ttfts, 50):.0f} ms", flush=True)
    if args.dequantize_too:
        wall, dq, ttfts = run_loramux(model, args.adapter, texts, args.new_tokens, c.workdir("single_stream"),
                                      "dequantize")
        dq_rate = sum(map(len, dq)) / wall
        print(f"loramux --cpu-4bit-kernel dequantize: {dq_rate:.1f} tok/s, TTFT p50 "
              f"{1000 * c.percentile(ttfts, 50):.0f} ms; fused / dequantize {lx_rate / dq_rate:.2f}x, "
              f"greedy tokens equal in {sum(a == b for a, b in zip(lx, dq, strict=True))}/{len(texts)}", flush=True)
    from loramux.model.threads import set_threads

    set_threads(args.peft_threads)
    wall, peft = run_peft(model, args.adapter, texts, args.new_tokens)
    peft_rate = sum(map(len, peft)) / wall
    print(f"PEFT generate: {peft_rate:.1f} tok/s")
    same = sum(until_eos(a, eos) == b[: len(until_eos(a, eos))] for a, b in zip(lx, peft, strict=True))
    print(f"loramux / PEFT: {lx_rate / peft_rate:.2f}x; greedy tokens equal up to the first EOS in "
          f"{same}/{len(texts)} requests")


def until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """The tokens before the first EOS: past it loramux (ignore_eos) and PEFT (min_new_tokens,
    which forbids EOS) answer different questions."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


if __name__ == "__main__":
    main()
