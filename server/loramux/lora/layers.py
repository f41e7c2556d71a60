"""Stacked LoRA slots: every device slot's A and B for one base linear layer in one tensor.

A batch row carries its slot index; the LoRA term of the whole batch takes a fixed number
of tensor ops per layer, whatever the number of distinct adapters in it (the BGMV/SGMV
idea in plain torch). Loading an adapter is a copy into these tensors, not module surgery.

Two ways to apply it, chosen per forward by the batch's shape:
- *stacked* (few distinct adapters x rank): gather the batch's distinct adapters once,
  run every row through all of them in two matmuls, keep each row's own block by a
  0/1 mask. No per-row copies of A and B.
- *gathered* (many distinct adapters x high rank): gather each row's own A and B and
  run two batched matmuls, so the work stays proportional to rank, not to adapters.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

STACKED_MAX_COLUMNS = 512  # distinct adapters x rank up to which the stacked way is cheaper


class RowSlots(threading.local):
    """Which slot each batch row uses, shared by every wrapped layer for one forward.

    Thread-local: a prefill and a decode step may run at once on two threads, each with
    its own rows. `ranks` (rank of the adapter in each slot, 0: empty; kept by
    AdapterSlots) is the one list all threads share.
    """

    def __init__(self, ranks: list[int]) -> None:
        self.ranks = ranks
        self.active = False  # any row uses an adapter
        self.rank = 0  # the largest rank among the batch's slots: the only columns worth touching
        self.uniq: torch.Tensor | None = None  # [u] long: the batch's distinct slots
        self.onehot: torch.Tensor | None = None  # [B, u]: 1 where row b uses uniq[u] (stacked way)
        self.row_slot: torch.Tensor | None = None  # [B] long: row's slot, 0 for base rows (gathered way)
        self.row_on: torch.Tensor | None = None  # [B]: 1 for rows with an adapter, 0 for the bare base
        self.used: list[int] | None = None  # the batch's distinct slots, as Python ints

    def set(self, row_slots: list[int], device: torch.device) -> None:
        """`row_slots[i]` is row i's slot, or -1 for the bare base (whose LoRA term is 0)."""
        used = sorted({s for s in row_slots if s >= 0})
        self.used = used
        self.active = bool(used)
        if not used:
            return
        self.rank = max(self.ranks[s] for s in used)
        self.uniq = torch.tensor(used, dtype=torch.long, device=device)
        on = [1.0 if s >= 0 else 0.0 for s in row_slots]
        self.row_on = torch.tensor(on, device=device)
        if len(used) * self.rank <= STACKED_MAX_COLUMNS:
            index = {s: i for i, s in enumerate(used)}
            onehot = torch.zeros(len(row_slots), len(used))
            for row, s in enumerate(row_slots):
                if s >= 0:
                    onehot[row, index[s]] = 1.0
            self.onehot, self.row_slot = onehot.to(device), None
        else:
            self.onehot = None
            self.row_slot = torch.tensor([max(s, 0) for s in row_slots], dtype=torch.long, device=device)


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
        # Nothing to add when no adapter in the batch targets this layer (e.g. attention-only
        # adapters leave the MLP layers' slots empty).
        if not self.ctx.active or not any(self.filled[s] for s in self.ctx.used):
            return y
        ctx, r = self.ctx, self.ctx.rank
        xs = x.to(self.lora_a.dtype)  # [B, T, in]
        if ctx.onehot is not None:
            delta = self._stacked(xs, ctx.uniq, ctx.onehot, r)
        else:
            delta = self._gathered(xs, ctx.row_slot, r)
        # Per-row scaling after B, as PEFT orders it; 0 for bare-base rows, so y is unchanged.
        scale = self.scaling[ctx.row_slot] if ctx.onehot is None else ctx.onehot @ self.scaling[ctx.uniq]
        delta = delta * (scale * ctx.row_on).view(-1, 1, 1)
        return y + delta.to(y.dtype)

    def _stacked(self, xs: torch.Tensor, uniq: torch.Tensor, onehot: torch.Tensor, r: int) -> torch.Tensor:
        b, t, _ = xs.shape
        u = uniq.numel()
        a = self.lora_a[uniq, :r].reshape(u * r, self.in_features)  # [u*r, in]
        bt = self.lora_b[uniq, :, :r].permute(0, 2, 1).reshape(u * r, self.out_features)  # [u*r, out]
        h = (xs @ a.T).view(b, t, u, r) * onehot.view(b, 1, u, 1)  # each row keeps its own block
        return h.view(b, t, u * r) @ bt  # [B, T, out]

    def _gathered(self, xs: torch.Tensor, row_slot: torch.Tensor, r: int) -> torch.Tensor:
        h = torch.bmm(xs, self.lora_a[:, :r][row_slot].transpose(1, 2))  # [B, T, r]
        return torch.bmm(h, self.lora_b[:, :, :r][row_slot].transpose(1, 2))  # [B, T, out]

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
