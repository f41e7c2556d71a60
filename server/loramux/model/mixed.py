"""A decode step that also prefills newcomers' prompts: one forward over flattened tokens.

The running batch's rows give one token each, then each newcomer ("rider") its prompt's
uncached tokens, all in one sequence of a batch of one: every projection, LoRA term and
MLP sees the tokens as rows, whatever their request (per-token LoRA slots). Only attention
tells them apart (`MixedLayer.attend`): the decode tokens attend over their rows of the
batch's cache, as a decode step does; a rider's tokens attend causally over its own cached
prefix and themselves. Keys and values go where each token's request keeps them: the
batch's next column, or the rider's own buffer, from which it joins the batch afterwards.

Why: on a CPU a forward has a fixed cost (every 4-bit weight dequantized, ~1,000 small
ops), ~45 ms of a 160 ms one-row prefill of 34 tokens on SmolLM2 (bench/README.md). A
newcomer admitted between decode steps pays it again and the running rows wait for it;
inside the step it pays only its tokens' share (Sarathi-Serve's stall-free batching, vLLM's
chunked prefill).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

_current = threading.local()  # the layer whose update ran last in this thread's mixed forward


def current() -> MixedLayer | None:
    """The mixed forward's layer now attending, or None outside a mixed forward."""
    return getattr(_current, "layer", None)


def done() -> None:
    """The mixed forward is over (or failed): attention goes back to its usual way."""
    _current.layer = None


def causal(past: int, width: int, device: torch.device) -> torch.Tensor:
    """Which of a prompt's `width` keys each of its new tokens (after `past` cached ones) may
    attend to, as SDPA takes it: [1, 1, width - past, width] bool. Made once per forward."""
    seen = torch.arange(width, device=device).view(1, -1)
    return (seen <= torch.arange(past, width, device=device).view(-1, 1))[None, None]


@dataclass
class Rider:
    """One newcomer's keys and values for one layer: [1, kv_heads, past + new, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor
    past: int  # cached tokens at the start of its buffers
    start: int  # its first token's index in the flattened sequence
    causal: torch.Tensor  # `causal(past, past + new)`, shared by every layer

    @property
    def new(self) -> int:
        return self.keys.shape[2] - self.past


class MixedLayer(DynamicLayer):
    """One layer of a mixed forward: the batch's `RowLayer` (its next column opened) and each
    rider's buffers. `update` writes every token's keys and values where its request keeps
    them; `attend` computes each request's attention over its own."""

    def __init__(self, rows, mask: torch.Tensor, riders: list[Rider]) -> None:
        super().__init__()
        self.rows, self.mask, self.riders = rows, mask, riders  # mask: [n, live columns] bool
        self.device, self.is_initialized = rows.buf_k.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, n = self.rows, self.rows.n
        # [1, kv_heads, T, dim] -> the batch's column `hi` for the first n tokens.
        rows.buf_k[:n, :, rows.hi].copy_(key_states[0, :, :n].transpose(0, 1))
        rows.buf_v[:n, :, rows.hi].copy_(value_states[0, :, :n].transpose(0, 1))
        for r in self.riders:
            r.keys[0, :, r.past:].copy_(key_states[0, :, r.start:r.start + r.new])
            r.values[0, :, r.past:].copy_(value_states[0, :, r.start:r.start + r.new])
        _current.layer = self
        return key_states, value_states

    def attend(self, module, query: torch.Tensor, scaling: float | None, attend: Callable,
               **kwargs) -> tuple[torch.Tensor, None]:
        """query [1, heads, T, dim] -> [1, T, heads, dim]; `attend` is the attention function
        for one kind of call (decode rows, or one prompt) with transformers' signature."""
        rows, n = self.rows, self.rows.n
        cols = slice(rows.lo, rows.hi + 1)
        q = query[0, :, :n].transpose(0, 1).unsqueeze(2)  # [n, heads, 1, dim]
        out = [attend(module, q, rows.buf_k[:n, :, cols], rows.buf_v[:n, :, cols],
                      self.mask[:, None, None, :], scaling=scaling, **kwargs)[0].view(n, *query.shape[1:2], -1)]
        for r in self.riders:
            o = attend(module, query[:, :, r.start:r.start + r.new], r.keys, r.values, r.causal,
                       scaling=scaling, **kwargs)[0]
            out.append(o.view(r.new, *o.shape[2:]))
        return torch.cat(out).unsqueeze(0), None
