"""Stacked LoRA slots: every device slot's A and B for one base linear layer in one tensor.

A batch row carries its slot index. Each forward's rows are planned once (`RowSlots`), and
every wrapped layer applies the plan to its own slot tensors: no copy of any adapter's
weights at any step, and work that follows the rows' tokens, not the number of slots.

Decode steps take two ways, mixed in one forward by a cost model (`LoraCosts`):
- *direct*: the tokens of one adapter (most often all rows of one adapter, or a whole
  prompt) through two matmuls on views of its slot: `y += s * (x A^T) B^T`. A few tensor
  ops per adapter per layer.
- *grouped*: the remaining tokens, scattered into a [slots, P, features] block (P: the
  most tokens any of them has; slots: from the lowest to the highest grouped slot) and
  run through two batched matmuls over those slots' A and B at once: a fixed number of
  ops per layer, whatever the number of adapters, plus padding (a slot with fewer than P
  tokens, or none, computes rows nobody reads).
With 32 rows of 32 adapters a decode step takes the grouped way (6 ops per layer instead
of ~130); one adapter, or a prompt, takes the direct way (2-4 ops, no padding).

Prompts of several adapters take a third, *row-wise*: each row's slot weights gathered into
[rows, r, features] (a few rank rows per row, fewer bytes than its tokens), then two batched
matmuls over the rows as they lie, the second adding into the output in place: 5 ops per
layer, no token gather, scatter or padding. The direct way there cost 4 ops per adapter per
layer (8 prompts of 8 adapters: ~25% more than 8 prompts of one; now within noise of it).

Where the model runner loaded loramux's CPU kernels (`ctx.kernel`), decode steps take a
fourth, *fused*: `torch.ops.loramux.lora_rows`, one call per layer for every row and
adapter, each slot's weights read once per group of its rows and added into the output in
place. On SmolLM2, a 32-row step of 32 adapters: 211 -> 178 ms (grouped way -> fused).
Where the base layer is loramux's 4-bit kernel too, the model runner hands the layer that
kernel's `with_lora` form: the base product and the term in one call (`with_lora`).

Slot tensors are allocated per layer on the first adapter that targets it, so a server
whose adapters only touch attention pays nothing for the MLP layers. B is stored
transposed ([rank, out] per slot) so both ways read it without a permuted copy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from loramux.memory import huge_empty


@dataclass
class LoraCosts:
    """What the plan weighs, in seconds per layer: one adapter's tokens on the direct way
    (its fixed cost: a few small ops), the grouped way's fixed cost, and its compute per
    token row and rank unit (padding included). Measured on the served model at start-up
    (`Runner.calibrate`); these defaults only order things."""

    direct: float = 4e-5
    group: float = 6e-5
    row_rank: float = 1e-8


@dataclass
class Plan:
    """How one forward's tokens (B x T, flattened) meet their slots."""

    direct: list[tuple[int, torch.Tensor | None, int]]  # (slot, token indices or None: all, rank)
    gather: torch.Tensor | None = None  # [slots * P] token index per grouped position
    width: int = 0  # P
    rank: int = 0  # the largest rank among the grouped slots
    span: slice = field(default_factory=lambda: slice(0))  # the grouped slots lie in this range: only it is computed
    valid: torch.Tensor | None = None  # grouped positions that hold a real token (None: all)
    tokens: torch.Tensor | None = None  # token index of each valid grouped position
    # The row-wise way (prompts of several adapters): each row's slot, and the rows that have
    # one (None: every row).
    row_slots: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    # The fused kernel's way (decode steps on a CPU that has it): every row's slot (-1: bare)
    # in `row_slots`, each slot's rank here.
    slot_ranks: torch.Tensor | None = None


class RowSlots(threading.local):
    """Which slot each batch row uses, shared by every wrapped layer for one forward.

    Thread-local: a prefill and a decode step may run at once on two threads, each with
    its own rows. `ranks` (rank of the adapter in each slot, 0: empty; kept by
    AdapterSlots) is the one list all threads share; so is `costs` (a thread-local's
    `__init__` runs again in each thread, with the same arguments).
    """

    def __init__(self, ranks: list[int], max_rank: int, costs: LoraCosts, kernel: str | None = None) -> None:
        self.ranks = ranks
        self.max_rank = max_rank
        self.costs = costs
        # Chosen by the model runner where `torch.ops.loramux.lora_rows` is loaded and the slots
        # are float32 on the CPU: "avx2" or "avx512", the build it runs; None: torch ops only.
        # A constructor argument, like `costs`: set on the instance afterwards, it would hold
        # only in the thread that set it, not in the engine's.
        self.kernel = kernel
        self.active = False  # any row uses an adapter
        self.used: list[int] = []  # the batch's distinct slots
        self._rows: list[int] = []
        self._device = torch.device("cpu")
        self._plan: tuple[int, Plan] | None = None  # (tokens per row, plan) of this forward
        self._per_token = False

    def set(self, row_slots: list[int], device: torch.device, per_token: bool = False) -> None:
        """`row_slots[i]` is row i's slot, or -1 for the bare base (whose LoRA term is 0);
        `per_token`: the forward's tokens are one sequence and `row_slots` has one per token
        (a mixed forward: decode rows and prompts flattened), planned as rows of one token."""
        self._rows, self._device, self._plan = list(row_slots), device, None
        self._per_token = per_token
        self.used = sorted({s for s in row_slots if s >= 0})
        self.active = bool(self.used)

    def plan(self, t: int) -> Plan:
        """This forward's plan for rows of `t` tokens each (made by the first layer)."""
        t = 1 if self._per_token else t
        if self._plan is None or self._plan[0] != t:
            self._plan = (t, self._make_plan(t))
        return self._plan[1]

    def _make_plan(self, t: int) -> Plan:
        if t == 1 and self.kernel:  # the kernel groups rows by slot itself
            return Plan([], row_slots=torch.tensor(self._rows, dtype=torch.long),
                        slot_ranks=torch.tensor(self.ranks, dtype=torch.long))
        rows_of: dict[int, list[int]] = {}
        for row, s in enumerate(self._rows):
            if s >= 0:
                rows_of.setdefault(s, []).append(row)
        # Largest first: the direct way pays per adapter, the grouped way per padded row.
        order = sorted(rows_of, key=lambda s: -len(rows_of[s]))
        if t > 1 and len(order) > 1:
            return self._row_wise(rows_of)
        k = self._split(order, [len(rows_of[s]) * t for s in order])
        every_row = len(self._rows) == len(rows_of.get(order[0], ()))
        direct = [(s, None if every_row else self._tokens(rows_of[s], t).to(self._device), self.ranks[s])
                  for s in order[:k]]
        plan = Plan(direct)
        if k < len(order):
            self._group(plan, {s: rows_of[s] for s in order[k:]}, t)
        return plan

    def _split(self, order: list[int], counts: list[int]) -> int:
        """How many of the largest adapters take the direct way (the rest: grouped)."""
        c = self.costs
        best, best_k = float("inf"), 0
        for k in range(len(order) + 1):
            cost = k * c.direct
            if k < len(order):
                rank = max(self.ranks[s] for s in order[k:])
                span = max(order[k:]) - min(order[k:]) + 1
                cost += c.group + span * counts[k] * rank * c.row_rank
            if cost < best:
                best, best_k = cost, k
        return best_k

    @staticmethod
    def _tokens(rows: list[int], t: int) -> torch.Tensor:
        """The flattened token indices of `rows` of `t` tokens each (on the CPU)."""
        idx = torch.tensor(rows, dtype=torch.long).view(-1, 1) * t + torch.arange(t)
        return idx.view(-1)

    def _row_wise(self, rows_of: dict[int, list[int]]) -> Plan:
        """Prompts of several adapters: every row meets its own slot's weights, gathered per row
        (a few rank rows each, fewer bytes than the row's tokens); no token gather or padding."""
        rows = sorted(row for r in rows_of.values() for row in r)
        slots = [self._rows[row] for row in rows]
        every = len(rows) == len(self._rows)
        return Plan([], rank=max(self.ranks[s] for s in rows_of),
                    row_slots=torch.tensor(slots, dtype=torch.long).to(self._device),
                    rows=None if every else torch.tensor(rows, dtype=torch.long).to(self._device))

    def _group(self, plan: Plan, rows_of: dict[int, list[int]], t: int) -> None:
        # Only the slots from the lowest to the highest grouped one are computed (and their
        # weights read): 8 adapters in slots 0-7 of 32 cost 8 slots' work, not 32.
        lo, hi = min(rows_of), max(rows_of) + 1
        width = max(len(r) for r in rows_of.values()) * t
        gather = torch.zeros(hi - lo, width, dtype=torch.long)
        valid = torch.zeros(hi - lo, width, dtype=torch.bool)
        for s, rows in rows_of.items():
            idx = self._tokens(rows, t)
            gather[s - lo, : len(idx)] = idx
            valid[s - lo, : len(idx)] = True
        gather, valid = gather.view(-1), valid.view(-1)
        plan.gather, plan.width, plan.span = gather.to(self._device), width, slice(lo, hi)
        plan.rank = max(self.ranks[s] for s in rows_of)
        plan.tokens = gather[valid].to(self._device)  # each valid position's token, in position order
        plan.valid = None if bool(valid.all()) else valid.nonzero().view(-1).to(self._device)


class StackedLoraLinear(nn.Module):
    """Owns one base linear layer and the stacked LoRA weights of all slots for it."""

    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, ctx: RowSlots,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.num_slots, self.max_rank = num_slots, max_rank
        self._z = {"dtype": dtype, "device": device}
        # Allocated by the first adapter that targets this layer (`allocate_slots`).
        self.register_buffer("lora_a", None)  # [slots, max_rank, in]
        self.register_buffer("lora_bt", None)  # [slots, max_rank, out]: B^T
        # Kept apart rather than folded into B, as PEFT applies it.
        self.register_buffer("scaling", None)  # [slots]
        self.scales = [0.0] * num_slots  # the same, as Python floats for the direct way
        self.written = [0] * num_slots  # rows of each slot that may be non-zero (0: empty)
        self._slot_views: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.slot_bytes = 0  # of the slot tensors, once allocated
        # The direct way's operands per slot, (A^T [in, r], B^T [r, out]) views made once at
        # load: slicing and transposing at every call is ~4 of its ~8 tensor ops.
        self._views: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_slots
        # Set by the model runner where the base layer has it: `with_lora(x, a, bt, scaling,
        # slots, ranks)` is `base(x)` plus the fused way's term in one kernel call, or None
        # where that call does not apply.
        self.with_lora: Callable[..., torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Nothing to add when no adapter in the batch targets this layer (e.g. attention-only
        # adapters leave the MLP layers' slots empty).
        if not self.ctx.active or not any(self.written[s] for s in self.ctx.used):
            return self.base(x)
        plan = self.ctx.plan(x.shape[-2] if x.dim() == 3 else 1)
        if plan.slot_ranks is not None and self.with_lora is not None:
            y = self.with_lora(x, self.lora_a, self.lora_bt, self.scaling, plan.row_slots, plan.slot_ranks)
            if y is not None:
                return y
        y = self.base(x)
        xf = x.reshape(-1, self.in_features).to(self.lora_a.dtype)
        delta = torch.zeros_like(y) if y.dtype != self.lora_a.dtype else None
        yf = (delta if delta is not None else y).view(-1, self.out_features)
        if plan.slot_ranks is not None:
            # Each slot's adapter rank, not this layer's rows written: an adapter that does not
            # target this layer has zeros here (stage_slot clears them), which add nothing.
            torch.ops.loramux.lora_rows(xf.contiguous(), yf, self.lora_a, self.lora_bt, self.scaling,
                                        plan.row_slots, plan.slot_ranks, self.ctx.kernel == "avx512")
            return y if delta is None else y + delta.to(y.dtype)
        for slot, tokens, _ in plan.direct:
            if self.written[slot]:
                self._direct(xf, yf, slot, tokens)
        if plan.gather is not None:
            self._grouped(xf, yf, plan)
        if plan.row_slots is not None:
            self._row_wise(xf, yf, plan, x.shape[-2])
        return y if delta is None else y + delta.to(y.dtype)

    def _direct(self, xf: torch.Tensor, yf: torch.Tensor, slot: int, tokens: torch.Tensor | None) -> None:
        at, bt = self._views[slot]
        if tokens is None:  # every token: no gather, no scatter
            yf.addmm_(torch.mm(xf, at), bt, alpha=self.scales[slot])
        else:
            yf.index_add_(0, tokens, torch.mm(xf.index_select(0, tokens), at) @ bt, alpha=self.scales[slot])

    def _grouped(self, xf: torch.Tensor, yf: torch.Tensor, plan: Plan) -> None:
        r, p, span = plan.rank, plan.width, plan.span
        xs = xf.index_select(0, plan.gather).view(-1, p, self.in_features)
        # Each slot's rows meet only that slot's weights: another adapter's inf stays its own.
        h = torch.bmm(xs, self.lora_a[span, :r].transpose(1, 2)).mul_(self.scaling[span].view(-1, 1, 1))
        delta = torch.bmm(h, self.lora_bt[span, :r]).view(-1, self.out_features)
        if plan.valid is not None:
            delta = delta.index_select(0, plan.valid)
        yf.index_add_(0, plan.tokens, delta)

    def _row_wise(self, xf: torch.Tensor, yf: torch.Tensor, plan: Plan, t: int) -> None:
        r, idx = plan.rank, plan.row_slots
        xs = xf.view(-1, t, self.in_features)
        ys = yf.view(-1, t, self.out_features)
        if plan.rows is not None:
            xs = xs.index_select(0, plan.rows)
        a = self.lora_a[:, :r].index_select(0, idx)  # [rows, r, in]
        h = torch.bmm(xs, a.transpose(1, 2)).mul_(self.scaling.index_select(0, idx).view(-1, 1, 1))
        bt = self.lora_bt[:, :r].index_select(0, idx)  # [rows, r, out]
        if plan.rows is None:
            ys.baddbmm_(h, bt)
        else:
            ys.index_add_(0, plan.rows, torch.bmm(h, bt))

    def slot_numel(self) -> int:
        """Elements of this layer's slot tensors (A, B^T, scalings)."""
        return self.num_slots * (self.max_rank * (self.in_features + self.out_features) + 1)

    def allocate(self, memory: torch.Tensor) -> None:
        """Make the slot tensors as views of `memory` (`slot_numel` zeroed elements; `allocate_slots`)."""
        n, r = self.num_slots, self.max_rank
        a, bt, scaling = memory.split([n * r * self.in_features, n * r * self.out_features, n])
        self.lora_a, self.lora_bt = a.view(n, r, self.in_features), bt.view(n, r, self.out_features)
        self.scaling = scaling
        # Each slot's A, B^T and scaling, sliced once: loading slices only the rank's rows.
        self._slot_views = list(zip(self.lora_a.unbind(), self.lora_bt.unbind(), self.scaling.unbind(), strict=True))
        self.slot_bytes = self.lora_a.nbytes + self.lora_bt.nbytes + self.scaling.nbytes

    @torch.no_grad()
    def load_slot(self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None,
                  scaling: float) -> None:
        """Copy one adapter's A [r, in] and B^T [r, out] into `slot`; None clears it."""
        copy_into_slots(self.stage_slot(slot, a, bt, scaling))

    def stage_slot(self, slot: int, a: torch.Tensor | None, bt: torch.Tensor | None,
                   scaling: float) -> list[tuple[torch.Tensor, torch.Tensor | float | None]]:
        """Everything of loading `slot` but the copies: those are returned as (destination,
        source: a tensor, the scaling, or None for zeros), for `copy_into_slots` to make for
        all layers at once. Rows
        above an adapter's rank must read zero (the grouped way computes up to the largest
        rank in the batch): only rows a larger adapter wrote before are cleared."""
        written = self.written[slot]
        if a is None or bt is None:
            if not written:
                return []
            self.scales[slot], self._views[slot], self.written[slot] = 0.0, None, 0
            sa, sb, ss = self._slot_views[slot]
            return [(sa[:written], None), (sb[:written], None), (ss, None)]
        if self.lora_a is None:  # callers that stage layer by layer; AdapterSlots allocates all first
            allocate_slots([self])
        r = a.shape[0]
        sa, sb, ss = self._slot_views[slot]
        self.scales[slot], self.written[slot] = float(scaling), r
        va, vb = sa[:r], sb[:r]
        self._views[slot] = (va.t(), vb)
        copies = [(va, a), (vb, bt), (ss, scaling)]
        if written > r:
            copies += [(sa[r:written], None), (sb[r:written], None)]
        return copies


@torch.no_grad()
def copy_into_slots(copies: list[tuple[torch.Tensor, torch.Tensor | float | None]]) -> None:
    """Make the copies `stage_slot` returned (a source: a tensor, a number for a scaling, or
    None for zeros), of any number of layers, in a few batched calls: one adapter over 210
    layers took ~1,700 small tensor ops one by one (~20 ms on the engine thread, a stall of
    the whole batch)."""
    tensors = [(dst, src) for dst, src in copies if isinstance(src, torch.Tensor)]
    numbers = [(dst, float(src)) for dst, src in copies if src is not None and not isinstance(src, torch.Tensor)]
    if numbers:  # one tensor of all the scalings, split into 0-d views: no op per layer
        tensors += zip([d for d, _ in numbers], torch.tensor([f for _, f in numbers]).unbind(), strict=True)
    if tensors:
        torch._foreach_copy_([d for d, _ in tensors], [s for _, s in tensors], non_blocking=True)
    zeros = [dst for dst, src in copies if src is None]
    if zeros:
        torch._foreach_zero_(zeros)


def allocate_slots(layers: list[StackedLoraLinear]) -> None:
    """Slot tensors for those of `layers` that have none, carved out of one zeroed buffer
    that asks for huge pages. Each layer's own (1-3 MiB on SmolLM2) started on fresh 4 KiB
    pages: the first adapter over the 210 layers zeroed 596 MiB at ~150,000 page faults,
    0.6-4 s of the engine thread on this project's VM, a stall of every running row."""
    todo = [layer for layer in layers if layer.lora_a is None]
    if not todo:
        return
    sizes = [layer.slot_numel() for layer in todo]
    z = todo[0]._z
    memory = huge_empty((sum(sizes),), z["dtype"], z["device"]).zero_()
    for layer, part in zip(todo, memory.split(sizes), strict=True):
        layer.allocate(part)


def slot_memory(layers: dict[str, StackedLoraLinear]) -> tuple[int, int]:
    """(bytes the slot tensors take now, bytes they would take if every layer were targeted)."""
    now = sum(layer.slot_bytes for layer in layers.values())
    most = sum(layer.slot_numel() * torch.finfo(layer._z["dtype"]).bits // 8 for layer in layers.values())
    return now, most


def is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit and Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def attach_stacked_lora(model: nn.Module, num_slots: int, max_rank: int, dtype: torch.dtype,
                        device: torch.device,
                        kernel: str | None = None) -> tuple[RowSlots, dict[str, StackedLoraLinear]]:
    """Wrap every linear layer inside the decoder blocks (not the LM head) in place.

    Returns the shared row->slot context and the wrapped layers by module name (the name
    PEFT uses in its adapter files, e.g. `model.layers.0.self_attn.q_proj`).
    """
    ctx = RowSlots(ranks=[0] * num_slots, max_rank=max_rank, costs=LoraCosts(), kernel=kernel)
    names = [n for n, m in model.named_modules() if is_linear(m) and ".layers." in f".{n}"]
    wrapped: dict[str, StackedLoraLinear] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = StackedLoraLinear(getattr(parent, child), num_slots, max_rank, ctx, dtype, device)
        setattr(parent, child, layer)
        wrapped[name] = layer
    return ctx, wrapped
