"""A decode step's attention through loramux's CPU kernel (`kernels/attention.cpp`).

Registered with transformers as the attention implementation `NAME`: a forward with one
query position per row, float32 on the CPU, goes to `torch.ops.loramux.decode_attention`,
which reads each row's keys and values once, in place, for all the query heads that share
them. So does one row's prompt with a boolean mask per position (a mixed step's rider after
its cached prefix, `mixed`): each position is a kernel row over the same keys (a stride-0
view), its mask row saying which it sees; SDPA's path repeated the key/value heads for
their query heads first (a copy per layer), and on SmolLM2 took 0.56 ms a layer for 40
positions after 300 cached against the kernel's 0.40-0.52. A decode step's rows whose
prompts start with copies of the same prefix cache blocks go as teams (`teams`): the
kernel reads those keys and values once for the team. Anything else (batched prompts,
prompts without a mask, other devices and dtypes, features the kernel lacks:
dropout, soft caps, sliding windows, attention sinks, additive masks) goes to transformers'
own SDPA function, unchanged. Masks are built as for SDPA (boolean, true where a row
attends).

torch's CPU flash attention is made for many query positions; on decode steps of SmolLM2
(32 rows, 9 query heads over 3 key/value heads, 30 layers) it took ~11 ms a step at 40
cached positions and ~41 ms at 370, the kernel ~4 and ~17 (the bytes of keys and values at
~33 GB/s); whole 32-row steps 106 -> 97 ms and 137 -> 108 ms (bench/README.md, stop 23).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from loramux.model import mixed
from loramux.model.quant import plain_input

log = logging.getLogger(__name__)

NAME = "loramux_decode"
_UNSUPPORTED = ("softcap", "sliding_window", "position_bias", "s_aux", "sinks")
_wide = False  # the kernel build this CPU runs (set by `use_decode_kernel`)
_step = threading.local()  # the decode rows' teams (`teams`) during a forward of this thread


@contextmanager
def teams(plan: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """During a forward: the decode rows' teams, (lead, shared) int32 [rows] (`Batch.teams`):
    rows that share their first shared[b] positions' keys and values with row lead[b], which
    the kernel reads once for the whole team."""
    _step.plan = plan
    try:
        yield
    finally:
        _step.plan = None


def use_decode_kernel(model, isa: str) -> bool:
    """Make `model` run its decode steps' attention through the kernel (`isa`: "avx512" or
    "avx2", `kernels.isa()`); False, logged, where the model cannot switch implementation."""
    global _wide
    _wide = isa == "avx512"
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError) as exc:
        log.warning("decode attention kernel not used: %s", exc)
        return False
    return model.config._attn_implementation == NAME


def attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [B, H, q, D], key and value [B, Hkv, L, D];
    returns [B, q, H, D]. In a mixed forward (`mixed`), each request's tokens attend over
    their own keys and values, through this function again."""
    layer = mixed.current()
    if layer is not None:
        return layer.attend(module, query, scaling, _attend, dropout=dropout, **kwargs)
    return _attend(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _attend(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
            **kwargs) -> tuple[torch.Tensor, None]:
    if not _fits(query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, heads, positions, dim = query.shape
    scale = scaling if scaling is not None else dim ** -0.5
    if positions > 1:  # one row's prompt: each position a kernel row over the same keys and values
        q = query[0].transpose(0, 1).contiguous()  # [positions, heads, dim]
        out = torch.ops.loramux.decode_attention(q, key.expand(positions, -1, -1, -1),
                                                  value.expand(positions, -1, -1, -1),
                                                  attention_mask[0, 0].contiguous(), scale, _wide)
        return out.unsqueeze(0), None
    mask = None if attention_mask is None else attention_mask[:, 0, 0, :].expand(rows, -1)
    if mask is not None and mask.stride(-1) != 1:
        mask = mask.contiguous()
    plan = getattr(_step, "plan", None)
    lead, shared = plan if plan is not None and plan[0].shape[0] == rows else (None, None)
    out = torch.ops.loramux.decode_attention(query.reshape(rows, heads, dim).contiguous(), key, value,
                                              mask, scale, _wide, lead, shared)
    return out.view(rows, 1, heads, dim), None


def _fits(query, key, value, mask, dropout: float, kwargs: dict) -> bool:
    """Whether the kernel computes this call: float32 CPU tensors with contiguous head
    vectors, nothing it lacks, and either one query position a row with a boolean mask over
    the keys (or none), or one row of many positions with a boolean mask for each (a prompt
    after its cached prefix, say: the mask says which keys each position sees)."""
    rows, heads, positions, dim = query.shape
    if positions == 1:
        masks = mask is None or (mask.dim() == 4 and mask.shape[0] in (1, rows) and mask.shape[1:3] == (1, 1))
    else:
        masks = rows == 1 and mask is not None and mask.dim() == 4 and mask.shape[:3] == (1, 1, positions)
    return (masks and (mask is None or (mask.dtype == torch.bool and mask.shape[3] == key.shape[2]))
            and dropout == 0.0 and plain_input(query) and plain_input(key) and plain_input(value)
            and key.shape == value.shape and key.shape[0] == rows and key.shape[3] == dim
            and heads % key.shape[1] == 0 and dim % (16 if _wide else 8) == 0  # whole vectors of the ISA
            and key.stride(-1) == 1 and value.stride(-1) == 1
            and all(kwargs.get(name) is None for name in _UNSUPPORTED))
