"""What quantizing the base costs in quality: perplexity and greedy agreement per quantization.

The reference is the model's float32 weights (`--quantization none`; for SmolLM2 these are the
GGUF file's Q4_1 values, dequantized exactly). Each quantization is loaded the way the server
loads it (`loramux.model.loader.load_base`) and measured on:

- perplexity of a fixed held-out text (bench/data/heldout.txt, 722 words of plain prose);
- greedy agreement: for fixed chat questions, how many of the first N greedy tokens equal
  the float32 model's before the first difference (mean), and how many answers are equal whole.

    python -m bench.quality                         # the default model, nf4 int8 fp4 none
    python -m bench.quality --model tiny --quantizations nf4 none
"""

from __future__ import annotations

import argparse
import math
import time

import bench.common  # noqa: F401  (puts the repository root on sys.path)

QUESTIONS = [
    "What is the capital of France?", "What is the capital of Japan?", "Name three primary colors.",
    "How many legs does a spider have?", "What is water made of?", "Who wrote Romeo and Juliet?",
    "What is the largest planet in the solar system?", "Why is the sky blue?",
    "Give me a synonym for happy.", "What do bees make?", "How many days are in a leap year?",
    "What is the boiling point of water in Celsius?", "Translate 'thank you' into Spanish.",
    "What is 12 times 12?", "Which animal is known as the king of the jungle?",
    "What gas do plants take in from the air?", "Name a famous painting by Leonardo da Vinci.",
    "What is the freezing point of water in Fahrenheit?", "What language is spoken in Brazil?",
    "Write a short sentence about the sea.",
]


def load(model: str, quantization: str):
    import torch

    from loramux.model.loader import ModelSpec, load_base

    return load_base(ModelSpec(model, quantization, torch.device("cpu"), torch.float32))


def perplexity(model, tokenizer, text: str, window: int = 512) -> float:
    """exp(mean next-token loss) over the text in non-overlapping windows."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window + 1].unsqueeze(0)
            logits = model(input_ids=chunk[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
            total, count = total + float(loss), count + chunk.shape[1] - 1
    return math.exp(total / count)


def greedy(model, tokenizer, new_tokens: int) -> list[list[int]]:
    import torch

    out = []
    with torch.inference_mode():
        for q in QUESTIONS:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
            gen = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(gen[0, ids["input_ids"].shape[1]:].tolist())
    return out


def agreement(ref: list[list[int]], got: list[list[int]]) -> tuple[float, int]:
    """(mean tokens equal before the first difference, answers equal whole). An answer equal
    to the reference counts all its tokens (answers end at EOS, so some are short)."""
    prefixes = []
    for a, b in zip(ref, got, strict=True):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefixes.append(n)
    return sum(prefixes) / len(prefixes), sum(a == b for a, b in zip(ref, got, strict=True))


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="named model or folder (default: the default model)")
    p.add_argument("--quantizations", nargs="+", default=["none", "nf4", "int8", "fp4"])
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args(argv)
    text = (Path(__file__).parent / "data" / "heldout.txt").read_text()
    quants = ["none", *[q for q in args.quantizations if q != "none"]]
    ref, rows = None, []
    for quant in quants:
        t = time.perf_counter()
        model, tokenizer = load(args.model, quant)
        ppl = perplexity(model, tokenizer, text)
        answers = greedy(model, tokenizer, args.new_tokens)
        ref = ref or answers
        prefix, whole = agreement(ref, answers)
        mib = model.get_memory_footprint() / 2**20
        rows.append((quant, ppl, prefix, whole, mib))
        print(f"{quant}: perplexity {ppl:.3f}, greedy prefix {prefix:.1f}/{args.new_tokens}, "
              f"equal answers {whole}/{len(QUESTIONS)}, {mib:.0f} MiB ({time.perf_counter() - t:.0f} s)", flush=True)
        if quant != "none" or len(quants) == 1:
            print("  e.g.", repr(tokenizer.decode(answers[0])))
        del model
    mean_len = sum(map(len, ref)) / len(ref)
    print(f"\n| quantization | perplexity (held-out text) | greedy tokens equal to float32 before the first "
          f"difference (float32 answers: {mean_len:.1f} tokens on average, at most {args.new_tokens}) "
          "| answers equal to float32 | weights MiB |")
    print("|---|---|---|---|---|")
    for quant, ppl, prefix, whole, mib in rows:
        print(f"| {quant} | {ppl:.2f} | {prefix:.1f} | {whole}/{len(QUESTIONS)} | {mib:.0f} |")


if __name__ == "__main__":
    main()
