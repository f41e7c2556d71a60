"""Stacked LoRA slots: every device slot's A and B for one base linear layer in one tensor.

A batch row carries its slot index; the LoRA term for the whole batch is one batched gather
and two batched matmuls (the BGMV idea in plain torch), whatever the number of distinct
adapters in the batch. Loading an adapter is a copy into these tensors, not module surgery.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RowSlots:
    """Which slot each batch row uses, shared by every wrapped layer for one forward."""

    ranks: list[int]  # rank of the adapter in each slot (0: empty), kept by AdapterSlots
    rows: torch.Tensor | None = None  # [n] long: batch rows that use an adapter
    slots: torch.Tensor | None = None  # [n] long: their slot indices
    rank: int = 0  # the largest rank among those slots: the only columns worth gathering

    def set(self, row_slots: list[int], device: torch.device) -> None:
        """`row_slots[i]` is row i's slot, or -1 for the bare base (which skips LoRA)."""
        pairs = [(r, s) for r, s in enumerate(row_slots) if s >= 0]
        if not pairs:
            self.rows = self.slots = None
            return
        rows, slots = zip(*pairs, strict=True)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.rank = max(self.ranks[s] for s in set(slots))


class StackedLoraLinear(nn.Module):
    """Owns one base linear layer and the stacked LoRA weights of all slots for it."""

    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, ctx: RowSlots,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        z = {"dtype": dtype, "device": device}
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, **z))
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, max_rank, **z))
        # Folded into B at load time would change rounding against PEFT; keep it apart.
        self.register_buffer("scaling", torch.zeros(num_slots, **z))  # [slots]
        self.filled = [False] * num_slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows, slots, r = self.ctx.rows, self.ctx.slots, self.ctx.rank
        if rows is None:
            return y
        # Slice to the batch's largest rank before gathering: padding columns are zeros,
        # so they add nothing but memory traffic.
        xs = x[rows].to(self.lora_a.dtype)  # [n, T, in]
        h = torch.bmm(xs, self.lora_a[:, :r][slots].transpose(1, 2))  # [n, T, r]
        delta = torch.bmm(h, self.lora_b[:, :, :r][slots].transpose(1, 2))  # [n, T, out]
        delta = delta * self.scaling[slots].view(-1, 1, 1)
        return y.index_add(0, rows, delta.to(y.dtype))

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None,
                  scaling: float) -> None:
        """Copy one adapter's A [r, in] and B [out, r] into `slot`; None clears it."""
        if a is None or b is None:
            if self.filled[slot]:
                self.lora_a[slot].zero_()
                self.lora_b[slot].zero_()
                self.scaling[slot] = 0.0
                self.filled[slot] = False
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_a[slot, r:].zero_()
        self.lora_b[slot, :, :r].copy_(b, non_blocking=True)
        self.lora_b[slot, :, r:].zero_()
        self.scaling[slot] = scaling
        self.filled[slot] = True


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def attach_stacked_lora(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[RowSlots, dict[str, StackedLoraLinear]]:
    """Wrap every linear layer inside the decoder blocks (not the LM head) in place.

    Returns the shared row->slot context and the wrapped layers by module name (the name
    PEFT uses in its adapter files, e.g. `model.layers.0.self_attn.q_proj`).
    """
    ctx = RowSlots(ranks=[0] * num_slots)
    names = [n for n, m in model.named_modules() if is_linear(m) and ".layers." in f".{n}"]
    wrapped: dict[str, StackedLoraLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = StackedLoraLinear(getattr(parent, child), num_slots, max_rank, ctx, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return ctx, wrapped
