"""StackedLoraLinear against a per-row reference, on both ways and any slot layout."""

from __future__ import annotations

import pytest
import torch

from loramux.lora.layers import LoraCosts, RowSlots, StackedLoraLinear, allocate_slots
from loramux.model import kernels

SLOTS, RANK, D_IN, D_OUT = 8, 4, 12, 10


def layer_with(adapters: dict[int, int], costs: LoraCosts) -> tuple[StackedLoraLinear, dict]:
    """A layer whose slots hold random adapters of the given ranks; their weights by slot."""
    torch.manual_seed(0)
    ctx = RowSlots([0] * SLOTS, RANK, costs)
    layer = StackedLoraLinear(torch.nn.Linear(D_IN, D_OUT), SLOTS, RANK, ctx, torch.float32, torch.device("cpu"))
    weights = {}
    for slot, rank in adapters.items():
        a, bt, scale = torch.randn(rank, D_IN), torch.randn(rank, D_OUT), 0.5 + slot
        layer.load_slot(slot, a, bt, scale)
        ctx.ranks[slot] = rank
        weights[slot] = (a, bt, scale)
    return layer, weights


def expected(layer: StackedLoraLinear, weights: dict, x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    y = layer.base(x)
    for i, slot in enumerate(rows):
        if slot >= 0:
            a, bt, scale = weights[slot]
            y[i] += scale * (x[i] @ a.T @ bt)
    return y


GROUPED = LoraCosts(direct=1.0, group=0.0, row_rank=0.0)  # every adapter takes the grouped way
DIRECT = LoraCosts(direct=0.0, group=1.0, row_rank=1.0)  # every adapter takes the direct way


@pytest.mark.parametrize("costs", [GROUPED, DIRECT], ids=["grouped", "direct"])
@pytest.mark.parametrize("rows", [
    [2, 5, 5, -1, 3],  # slots in the middle of the range: the grouped way computes slots 2-5 only
    [7, 7, 7],  # one adapter in the last slot
    [0, 6, -1, 6, 0, 4],
])
def test_each_row_gets_its_own_adapter(costs, rows):
    layer, weights = layer_with({0: 2, 2: 4, 3: 1, 4: 4, 5: 3, 6: 2, 7: 4}, costs)
    x = torch.randn(len(rows), 3, D_IN)  # 3 tokens per row, as a prefill
    layer.ctx.set(rows, torch.device("cpu"))
    with torch.inference_mode():
        got = layer(x)
        want = torch.stack([expected(layer, weights, x[:, t], rows) for t in range(3)], dim=1)
    torch.testing.assert_close(got, want)
    plan = layer.ctx.plan(3)
    used = [s for s in rows if s >= 0]
    if len(set(used)) > 1:  # prompts of several adapters take the row-wise way, whatever the costs
        assert plan.row_slots.tolist() == used and plan.gather is None and not plan.direct
        with_adapter = [i for i, s in enumerate(rows) if s >= 0]
        assert (plan.rows is None) if len(used) == len(rows) else plan.rows.tolist() == with_adapter
    else:
        assert plan.row_slots is None and (plan.gather is None) == (costs is DIRECT)


@pytest.mark.parametrize("costs", [GROUPED, DIRECT], ids=["grouped", "direct"])
@pytest.mark.parametrize("rows", [[2, 5, 5, -1, 3], [0, 6, -1, 6, 0, 4, 4, 4]])
def test_decode_steps_take_the_ways_the_costs_choose(costs, rows):
    layer, weights = layer_with({0: 2, 2: 4, 3: 1, 4: 4, 5: 3, 6: 2, 7: 4}, costs)
    x = torch.randn(len(rows), 1, D_IN)
    layer.ctx.set(rows, torch.device("cpu"))
    with torch.inference_mode():
        got = layer(x)
        want = expected(layer, weights, x[:, 0], rows).unsqueeze(1)
    torch.testing.assert_close(got, want)
    plan = layer.ctx.plan(1)
    used = [s for s in rows if s >= 0]
    assert plan.row_slots is None
    if costs is GROUPED:
        assert plan.span == slice(min(used), max(used) + 1) and not plan.direct
    else:
        assert plan.gather is None and len(plan.direct) == len(set(used))


KERNEL = kernels.isa() if kernels.isa() is not None and kernels.load() else None
ISAS = [isa for isa in ("avx2", "avx512") if KERNEL == "avx512" or isa == KERNEL]


@pytest.mark.skipif(not ISAS, reason="no AVX2 or no C++ compiler: no fused kernel")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("d_in", "d_out"), [(D_IN, D_OUT), (48, 40)])  # lanes' tails; whole vectors and tails
@pytest.mark.parametrize("rows", [
    [2, 5, 5, -1, 3],
    [7] * 9,  # one adapter over more rows than a group: groups of 4, 4 and 1
    [0, 6, -1, 6, 0, 4, 4, 4, 4, 4, 6],
    [-1, -1],  # bare rows only: nothing added
])
def test_fused_kernel_gives_each_row_its_own_adapter(isa, d_in, d_out, rows):
    torch.manual_seed(0)
    ctx = RowSlots([0] * SLOTS, RANK, LoraCosts())
    ctx.kernel = isa
    layer = StackedLoraLinear(torch.nn.Linear(d_in, d_out), SLOTS, RANK, ctx, torch.float32, torch.device("cpu"))
    weights = {}
    # Slot 4 held a rank-4 adapter before its rank-2 one: its rows 2-3 must read zero.
    layer.load_slot(4, torch.randn(RANK, d_in), torch.randn(RANK, d_out), 9.0)
    for slot, rank in {0: 2, 2: 4, 3: 1, 4: 2, 5: 3, 6: 2, 7: 4}.items():
        a, bt, scale = torch.randn(rank, d_in), torch.randn(rank, d_out), 0.5 + slot
        layer.load_slot(slot, a, bt, scale)
        ctx.ranks[slot] = rank
        weights[slot] = (a, bt, scale)
    x = torch.randn(len(rows), 1, d_in)
    ctx.set(rows, torch.device("cpu"))
    with torch.inference_mode():
        got = layer(x)
        want = expected(layer, weights, x[:, 0], rows).unsqueeze(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)  # outputs ~100: float32 rounding
    plan = ctx.plan(1)
    assert plan.row_slots.tolist() == rows and not plan.direct and plan.gather is None


def test_the_kernel_choice_holds_in_every_thread():
    """The engine runs the model on its own thread: the runner's choice must reach it (the
    context is thread-local, so an attribute set after construction would not)."""
    import threading

    from loramux.lora.layers import attach_stacked_lora

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(D_IN, D_OUT)])
    ctx, _ = attach_stacked_lora(model, SLOTS, RANK, torch.float32, torch.device("cpu"), kernel="avx2")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ctx.kernel))
    thread.start()
    thread.join()
    assert seen == ["avx2"] and ctx.kernel == "avx2"


def test_layers_allocated_together_share_one_zeroed_buffer_and_compute_as_alone():
    torch.manual_seed(0)
    ctx = RowSlots([0] * SLOTS, RANK, GROUPED)
    layers = [StackedLoraLinear(torch.nn.Linear(D_IN, D_OUT), SLOTS, RANK, ctx, torch.float32, torch.device("cpu"))
              for _ in range(3)]
    for t in (layers[0].lora_a, layers[0].lora_bt, layers[0].scaling):
        assert t is None
    allocate_slots(layers)
    storage = {layer.lora_a.untyped_storage().data_ptr() for layer in layers}
    assert len(storage) == 1 and all(float(t.abs().sum()) == 0 for layer in layers
                                     for t in (layer.lora_a, layer.lora_bt, layer.scaling))
    first = layers[0].lora_a
    allocate_slots(layers)  # allocated already: kept
    assert layers[0].lora_a is first
    weights = {}
    for i, layer in enumerate(layers):
        a, bt = torch.randn(RANK, D_IN), torch.randn(RANK, D_OUT)
        layer.load_slot(i, a, bt, 0.5)
        weights[i] = {i: (a, bt, 0.5)}
    ctx.ranks[:3] = [RANK] * 3
    rows = [0, 1, 2, -1]
    ctx.set(rows, torch.device("cpu"))
    x = torch.randn(len(rows), 2, D_IN)
    for i, layer in enumerate(layers):  # each layer's slot i only: its neighbours' writes never show
        want = expected(layer, {**{j: (torch.zeros(RANK, D_IN), torch.zeros(RANK, D_OUT), 0.0) for j in range(3)},
                                **weights[i]}, x, rows)
        torch.testing.assert_close(layer(x), want)
