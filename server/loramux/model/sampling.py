"""Next-token choice per row: greedy, or temperature / top-k / top-p with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """A row's sampling settings (already validated). temperature 0 means greedy."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def make_generator(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if sampling.seed is None:
        gen.seed()
    else:
        gen.manual_seed(sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


def sample(logits: torch.Tensor, rows: list[Sampling], gens: list[torch.Generator | None]) -> list[int]:
    """logits [B, vocab] -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()
    for i, (s, gen) in enumerate(zip(rows, gens, strict=True)):
        if s.temperature > 0:
            out[i] = _sample_row(logits[i].float(), s, gen)
    return out


def _sample_row(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    logits = (logits / s.temperature).nan_to_num(posinf=torch.finfo(logits.dtype).max)
    if 0 < s.top_k < logits.numel():
        kth = torch.topk(logits, s.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (sorted_p.cumsum(0) - sorted_p) >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    if not torch.isfinite(probs).all() or probs.sum() <= 0:
        return int(logits.argmax())  # a temperature so small it overflowed: that is greedy
    return int(torch.multinomial(probs, 1, generator=gen).item())
