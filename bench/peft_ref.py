"""PEFT, the correctness oracle and the baseline: the served model's 4-bit base with every
adapter loaded, configured like the server, and greedy generation one request at a time or
in static batches with mixed `adapter_names`. `parity` checks a bench's loramux answers
against it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from bench import common as c


def load_peft(base_path: Path, adapters: dict[str, Path]):
    """PeftModel on the 4-bit base configured like the server, every adapter loaded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramux.model.loader import honour_compute_dtype, quantization_config

    dtype = torch.float32
    base = AutoModelForCausalLM.from_pretrained(
        str(base_path), dtype=dtype, device_map={"": "cpu"}, quantization_config=quantization_config("nf4", dtype))
    base.eval()
    honour_compute_dtype(base, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model, tokenizer


def _answer(row, max_new: int, eos: set[int]) -> list[int]:
    """A request's own tokens out of a generated row: up to max_new, through the first EOS."""
    out = []
    for t in row[:max_new]:
        out.append(int(t))
        if t in eos:
            break
    return out


def peft_one_at_a_time(model, tokenizer, requests: list[c.BenchRequest]) -> tuple[float, list[list[int]]]:
    import torch

    eos, pad = {tokenizer.eos_token_id}, tokenizer.pad_token_id
    answers = []
    start = time.perf_counter()
    with torch.inference_mode():
        for n, req in enumerate(requests):
            _progress("PEFT (a)", n, len(requests), start)
            ids = torch.tensor([tokenizer(req.prompt).input_ids])
            with _adapter(model, req.adapter_id):
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=req.max_new_tokens, do_sample=False, pad_token_id=pad)
            answers.append(_answer(out[0, ids.shape[1]:].tolist(), req.max_new_tokens, eos))
    return time.perf_counter() - start, answers


def peft_static_batches(model, tokenizer, requests: list[c.BenchRequest], batch: int) -> tuple[float, list[list[int]]]:
    import torch

    tokenizer.padding_side = "left"
    eos, pad = {tokenizer.eos_token_id}, tokenizer.pad_token_id
    answers = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(requests), batch):
            _progress("PEFT (b)", i, len(requests), start)
            group = requests[i:i + batch]
            enc = tokenizer([r.prompt for r in group], return_tensors="pt", padding=True)
            out = model.generate(**enc, adapter_names=[r.adapter_id for r in group],
                                 max_new_tokens=max(r.max_new_tokens for r in group), do_sample=False,
                                 pad_token_id=pad)
            width = enc.input_ids.shape[1]
            answers += [_answer(out[j, width:].tolist(), r.max_new_tokens, eos) for j, r in enumerate(group)]
    return time.perf_counter() - start, answers


def _progress(label: str, done: int, total: int, start: float) -> None:
    if done and done % 16 == 0 or label.endswith("(b)") and done:
        print(f"  {label}: {done}/{total} requests, {time.perf_counter() - start:.0f} s", flush=True)


def peft_warm_up(model, tokenizer, adapter_ids: list[str]) -> None:
    warm = c.make_requests(2, 0, seed=c.SEED + 99, new_range=(4, 4))
    warm = [c.BenchRequest(r.index, adapter_ids[i % len(adapter_ids)], r.prompt, r.prompt_tokens, r.max_new_tokens)
            for i, r in enumerate(warm)]
    peft_one_at_a_time(model, tokenizer, warm[:1])
    peft_static_batches(model, tokenizer, warm, 2)


def _adapter(model, adapter_id: str):
    """The adapter a request names, or none at all for the bare base ("")."""
    if not adapter_id:
        return model.disable_adapter()
    model.set_adapter(adapter_id)
    return contextlib.nullcontext()


def parity(model, tokenizer, requests: list[c.BenchRequest], answers: list[list[int]]) -> dict:
    """Generate `requests` with PEFT one at a time and compare loramux's `answers` (same
    order) token for token, each up to and including its first EOS: with `ignore_eos`
    loramux goes on past it, PEFT stops there."""
    _, ref = peft_one_at_a_time(model, tokenizer, requests)
    eos = {tokenizer.eos_token_id}
    same = sum(_answer(a, len(a), eos) == r for a, r in zip(answers, ref, strict=True))
    return {"checked": len(requests), "identical": same}
