"""Cost-model constants measured on the served model and device at start-up.

The scheduler and the LoRA plan weigh fixed costs (a forward, a tensor op) against work
per token. Those ratios differ by an order of magnitude between a 30M model and a 135M
one, and between a CPU and an accelerator, so they are timed here, on the model's own
layer shapes, rather than written down once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

import torch

from loramux.lora.layers import LoraCosts
from loramux.model.head import DenseHead
from loramux.model.quant import Lean4bit

log = logging.getLogger(__name__)


def _seconds(fn: Callable[[], object], device: torch.device, repeat: int = 5) -> float:
    """Best of `repeat` timed calls after one warm-up call (the best: least disturbed)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def lora_costs(shapes: list[tuple[int, int]], num_slots: int, rank: int, dtype: torch.dtype,
               device: torch.device) -> LoraCosts:
    """Per-layer costs of the two LoRA ways (`lora.layers`), averaged over the model's
    wrapped layer shapes (in, out), with tensors like the slots' own."""
    total = LoraCosts(0.0, 0.0, 0.0)
    for shape, n in Counter(shapes).items():
        one = _shape_costs(*shape, num_slots, rank, {"dtype": dtype, "device": device})
        weight = n / len(shapes)
        total.direct += weight * one.direct
        total.group += weight * one.group
        total.row_rank += weight * one.row_rank
    return total


def _shape_costs(d_in: int, d_out: int, num_slots: int, rank: int, z: dict, rows: int = 4) -> LoraCosts:
    device = z["device"]
    a, bt = torch.randn(num_slots, rank, d_in, **z), torch.randn(num_slots, rank, d_out, **z)
    scaling = torch.ones(num_slots, 1, 1, **z)
    x, y = torch.randn(num_slots * rows, d_in, **z), torch.zeros(num_slots * rows, d_out, **z)
    one = torch.tensor([1], device=device)

    def direct() -> None:
        y.index_add_(0, one, x.index_select(0, one) @ a[0].T @ bt[0], alpha=0.5)

    def grouped(p: int) -> Callable[[], None]:
        idx = torch.arange(num_slots * p, device=device)

        def run() -> None:
            xs = x.index_select(0, idx).view(num_slots, p, d_in)
            h = torch.bmm(xs, a.transpose(1, 2)).mul_(scaling)
            y.index_add_(0, idx, torch.bmm(h, bt).view(-1, d_out))
        return run

    one_row, more_rows = _seconds(grouped(1), device), _seconds(grouped(rows), device)
    row_rank = max(more_rows - one_row, 0.0) / (num_slots * (rows - 1) * rank)
    return LoraCosts(_seconds(direct, device), max(one_row - num_slots * rank * row_rank, 0.0), row_rank)


def _crossover(rows: tuple[int, ...], switch: Callable[[int], None], make: Callable[[int], Callable[[], object]],
               repeat: int, same: Callable[[object, object], bool] | None = None) -> int | None:
    """The largest of `rows` (ascending) up to which a fast way beats the usual one: `switch(n)`
    turns the fast way on for inputs of up to n rows, `switch(0)` off, and `make(n)` gives the
    call timed with n rows. The fast way wins at few rows and loses its lead as rows grow, so
    the first loss ends the search, once timed again: on a shared VM one disturbed timing
    chose 0 rows for the 4-bit kernel, and every decode step then ran 1.7x slower. None if
    `same` (given the two ways' outputs) fails."""
    chosen = 0
    for n in rows:
        run, outs = make(n), []
        if same is not None:  # the outputs compared; timing warms up on its own
            for limit in (n, 0):
                switch(limit)
                outs.append(run())
            if not same(*outs):
                return None
        if not any(_faster(run, n, switch, repeat) for _ in range(2)):
            break
        chosen = n
    return chosen


def _faster(run: Callable[[], object], n: int, switch: Callable[[int], None], repeat: int) -> bool:
    """Whether `run` takes less time with the fast way on for n rows than with it off."""
    times = []
    for limit in (n, 0):
        switch(limit)
        times.append(_seconds(run, torch.device("cpu"), repeat))
    return times[0] <= times[1]


@torch.inference_mode()
def fused_4bit_rows(lean: Lean4bit, rows: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
                    repeat: int = 3) -> int:
    """Up to how many input rows the fused 4-bit kernel beats dequantize-then-matmul on the
    model's own layer shapes (one of each), 0 if it never does. Up to 1024 rows: a prefill
    of --max-prefill-tokens (512) or a mixed step's rider beside a decode batch (on SmolLM2
    the AVX2 panels beat MKL 1.03-1.5x from 128 to 2048 rows; measured only to 256, every
    prompt of more rows paid dequantize-then-matmul)."""
    if not lean.fused_rows:
        return 0
    layers = lean.first_block()

    def make(n: int) -> Callable[[], object]:
        xs = [torch.randn(n, m.in_features) for m in layers]
        return lambda: [m(x) for m, x in zip(layers, xs, strict=True)]

    lean.fused_rows = _crossover(rows, lambda limit: setattr(lean, "fused_rows", limit), make, repeat)
    log.info("fused 4-bit kernel (%s) for inputs of up to %d rows", "avx512" if lean.wide else "avx2",
             lean.fused_rows)
    return lean.fused_rows


@torch.inference_mode()
def dense_head_rows(head: DenseHead, rows: tuple[int, ...] = (1, 8, 32, 128), repeat: int = 3) -> int:
    """Up to how many input rows the head's faster op (loramux's or oneDNN's) beats its own
    forward on the model's output head, 0 if it never does or its numbers are not the same product (then
    a warning). Up to 128 rows: the head sees a decode batch or a prefill's last positions,
    and each size timed costs start-up (on SmolLM2 up to 256 rows took 3.4 s)."""
    if head.op is None:
        return 0

    def make(n: int) -> Callable[[], object]:
        x = torch.randn(n, head.module.in_features)
        return lambda: head.module(x)

    def same(fast: torch.Tensor, usual: torch.Tensor) -> bool:
        return torch.allclose(fast, usual, rtol=1e-4, atol=1e-4 * float(usual.abs().max()))

    chosen = _crossover(rows, lambda limit: setattr(head, "rows", limit), make, repeat, same)
    if chosen is None:
        log.warning("the output head's faster op disagrees with its own product; not used")
    head.rows = chosen or 0
    log.info("output head through %s for inputs of up to %d rows", head.name, head.rows)
    return head.rows


def forward_cost_tokens(prefill: Callable[[list[list[int]]], object], token: int, device: torch.device,
                        short: int = 8, long: int = 64) -> float:
    """A prefill forward's fixed cost in prompt tokens' worth: time one prompt of `short`
    and one of `long` tokens; the line through them crosses zero tokens at the fixed cost."""
    t_short = _seconds(lambda: prefill([[token] * short]), device, repeat=3)
    t_long = _seconds(lambda: prefill([[token] * long]), device, repeat=3)
    per_token = max((t_long - t_short) / (long - short), 1e-9)
    return max(t_short - short * per_token, 0.0) / per_token
