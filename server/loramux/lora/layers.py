"""Stacked LoRA slots: every device slot's A and B for one base linear layer in one tensor.

A batch row carries its slot index; the LoRA term of the whole batch takes a fixed number
of tensor ops per layer, whatever the number of distinct adapters in it (the BGMV/SGMV
idea in plain torch). Loading an adapter is a copy into these tensors, not module surgery.

Three ways to apply it, chosen once per forward by the batch's shape:
- *all slots* (the batch uses most of a small slot table): run every row through
  every slot in two matmuls on views of the slot tensors, keep each row's own block by a
  0/1 mask. No copies at all.
- *stacked* (few distinct adapters x rank): the same on a copy of just the batch's
  distinct adapters.
- *gathered* (many distinct adapters x high rank): gather each row's own A and B and
  run two batched matmuls, so the work stays proportional to rank, not to adapters.
B is stored transposed ([rank, out] per slot) so that every way reads it without a
permuted copy.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

STACKED_MAX_COLUMNS = 512  # distinct adapters x rank up to which the stacked ways are cheaper
# The share of a small slot table's columns a batch must use for the all-slots way to beat
# copying just those (measured on one CPU core, 25 rows: the crossover is at ~0.8).
ALL_SLOTS_MIN_SHARE = 0.8


class RowSlots(threading.local):
    """Which slot each batch row uses, shared by every wrapped layer for one forward.

    Thread-local: a prefill and a decode step may run at once on two threads, each with
    its own rows. `ranks` (rank of the adapter in each slot, 0: empty; kept by
    AdapterSlots) is the one list all threads share.
    """

    def __init__(self, ranks: list[int], max_rank: int) -> None:
        self.ranks = ranks
        self.max_rank = max_rank
        self.active = False  # any row uses an adapter
        self.rank = 0  # the largest rank among the batch's slots: the only columns worth touching
        self.uniq: torch.Tensor | None = None  # [u] long: the batch's distinct slots (stacked way)
        self.onehot: torch.Tensor | None = None  # [B, u]: 1 where row b uses uniq[u] (u: all slots
        #                                           when uniq is None); None: the gathered way
        self.off: torch.Tensor | None = None  # [B, u] bool: onehot == 0
        self.row_slot: torch.Tensor | None = None  # [B] long: row's slot, 0 for base rows (gathered way)
        self.row_off: torch.Tensor | None = None  # [B, 1, 1] bool: bare-base rows (gathered way)
        self.rows: torch.Tensor | None = None  # the rank rows to gather from [slots * max_rank, ...]
        #   views of the slot tensors: uniq's first `rank` rows (stacked), row_slot's (gathered)
        self.used: list[int] | None = None  # the batch's distinct slots, as Python ints
        self.key: tuple = ()  # what the stacked way's copies depend on, besides the weights
        # Per layer, the stacked way's last copies with the key and weight version they were
        # made for: consecutive decode steps mostly run the same adapters, so they reuse them.
        self.selected: dict[nn.Module, tuple[tuple, tuple[torch.Tensor, ...]]] = {}

    def set(self, row_slots: list[int], device: torch.device) -> None:
        """`row_slots[i]` is row i's slot, or -1 for the bare base (whose LoRA term is 0)."""
        used = sorted({s for s in row_slots if s >= 0})
        self.used = used
        self.active = bool(used)
        if not used:
            return
        self.rank = max(self.ranks[s] for s in used)
        columns, all_columns = len(used) * self.rank, len(self.ranks) * self.max_rank
        if all_columns <= STACKED_MAX_COLUMNS and columns >= ALL_SLOTS_MIN_SHARE * all_columns:  # no copy
            self.uniq, self.rank = None, self.max_rank
            self.onehot = self._onehot(row_slots, {s: s for s in used}, len(self.ranks), device)
        elif columns <= STACKED_MAX_COLUMNS:
            self.key = (tuple(used), self.rank)
            self.uniq = torch.tensor(used, dtype=torch.long, device=device)
            self.onehot = self._onehot(row_slots, {s: i for i, s in enumerate(used)}, len(used), device)
            self.rows = self._rank_rows(self.uniq)
        else:
            self.uniq = self.onehot = None
            self.row_slot = torch.tensor([max(s, 0) for s in row_slots], dtype=torch.long, device=device)
            self.row_off = torch.tensor([s < 0 for s in row_slots], device=device).view(-1, 1, 1)
            self.rows = self._rank_rows(self.row_slot)
        self.off = None if self.onehot is None else self.onehot == 0

    def _rank_rows(self, slots: torch.Tensor) -> torch.Tensor:
        # One index_select of these rows from a [slots * max_rank, features] view copies just
        # what is used, several times faster than advanced indexing of a [:, :rank] view.
        ranks = torch.arange(self.rank, device=slots.device)
        return (slots.view(-1, 1) * self.max_rank + ranks).view(-1)

    @staticmethod
    def _onehot(row_slots: list[int], column: dict[int, int], width: int,
                device: torch.device) -> torch.Tensor:
        onehot = torch.zeros(len(row_slots), width)
        for row, s in enumerate(row_slots):
            if s >= 0:
                onehot[row, column[s]] = 1.0
        return onehot.to(device)


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
        self.register_buffer("lora_bt", torch.zeros(num_slots, max_rank, self.out_features, **z))  # B^T
        # Folded into B at load time would change rounding against PEFT; keep it apart.
        self.register_buffer("scaling", torch.zeros(num_slots, **z))  # [slots]
        self.filled = [False] * num_slots
        self.version = 0  # counts changes of the slot tensors (RowSlots.selected's copies)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        # Nothing to add when no adapter in the batch targets this layer (e.g. attention-only
        # adapters leave the MLP layers' slots empty).
        if not self.ctx.active or not any(self.filled[s] for s in self.ctx.used):
            return y
        ctx = self.ctx
        xs = x.to(self.lora_a.dtype)  # [B, T, in]
        if ctx.onehot is not None:
            delta, scale = self._stacked(xs, ctx)
        else:
            delta, scale = self._gathered(xs, ctx)
        # Per-row scaling after B, as PEFT orders it; 0 for bare-base rows, so y is unchanged.
        return y + (delta * scale.view(-1, 1, 1)).to(y.dtype)

    def _stacked(self, xs: torch.Tensor, ctx: RowSlots) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = xs.shape
        r, onehot = ctx.rank, ctx.onehot
        u = onehot.shape[1]
        if ctx.uniq is None:  # every slot, full rank: views, no copy
            a, bt, scaling = self._flat_a(), self._flat_bt(), self.scaling
        else:
            a, bt, scaling = self._selected(ctx)
        # Each row keeps its own block. A fill, not a x0: another adapter's block may hold inf
        # (finite but huge weights), and inf x 0 would be NaN in this row.
        h = (xs @ a.T).view(b, t, u, r).masked_fill(ctx.off.view(b, 1, u, 1), 0.0)
        return h.view(b, t, u * r) @ bt, onehot @ scaling  # [B, T, out], [B]

    def _selected(self, ctx: RowSlots) -> tuple[torch.Tensor, ...]:
        """The batch's distinct adapters' A, B^T and scalings, copied again only when the
        adapters or a slot's weights changed (copying them was ~4% of a decode step)."""
        key = (ctx.key, self.version)
        last = ctx.selected.get(self)
        if last is not None and last[0] == key:
            return last[1]
        copies = (self._flat_a().index_select(0, ctx.rows), self._flat_bt().index_select(0, ctx.rows),
                  self.scaling.index_select(0, ctx.uniq))
        ctx.selected[self] = (key, copies)
        return copies

    def _gathered(self, xs: torch.Tensor, ctx: RowSlots) -> tuple[torch.Tensor, torch.Tensor]:
        b, r = xs.shape[0], ctx.rank
        a = self._flat_a().index_select(0, ctx.rows).view(b, r, self.in_features)
        bt = self._flat_bt().index_select(0, ctx.rows).view(b, r, self.out_features)
        h = torch.bmm(xs, a.transpose(1, 2))  # [B, T, r]
        delta = torch.bmm(h, bt).masked_fill(ctx.row_off, 0.0)  # bare rows ran slot 0: zero, not x0
        return delta, self.scaling.index_select(0, ctx.row_slot)

    def _flat_a(self) -> torch.Tensor:
        return self.lora_a.view(-1, self.in_features)  # [slots * max_rank, in]

    def _flat_bt(self) -> torch.Tensor:
        return self.lora_bt.view(-1, self.out_features)  # [slots * max_rank, out]

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None,
                  scaling: float) -> None:
        """Copy one adapter's A [r, in] and B^T [r, out] into `slot`; None clears it."""
        if a is None or bt is None:
            if self.filled[slot]:
                self.lora_a[slot].zero_()
                self.lora_bt[slot].zero_()
                self.scaling[slot] = 0.0
                self.filled[slot] = False
                self.version += 1
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a, non_blocking=True)
        self.lora_a[slot, r:].zero_()
        self.lora_bt[slot, :r].copy_(bt, non_blocking=True)
        self.lora_bt[slot, r:].zero_()
        self.scaling[slot] = scaling
        self.filled[slot] = True
        self.version += 1


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def attach_stacked_lora(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[RowSlots, dict[str, StackedLoraLinear]]:
    """Wrap every linear layer inside the decoder blocks (not the LM head) in place.

    Returns the shared row->slot context and the wrapped layers by module name (the name
    PEFT uses in its adapter files, e.g. `model.layers.0.self_attn.q_proj`).
    """
    ctx = RowSlots(ranks=[0] * num_slots, max_rank=max_rank)
    names = [n for n, m in model.named_modules() if is_linear(m) and ".layers." in f".{n}"]
    wrapped: dict[str, StackedLoraLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = StackedLoraLinear(getattr(parent, child), num_slots, max_rank, ctx, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return ctx, wrapped
