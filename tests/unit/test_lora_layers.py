"""StackedLoraLinear against a per-row reference, on both ways and any slot layout."""

from __future__ import annotations

import pytest
import torch

from loramux.lora.layers import LoraCosts, RowSlots, StackedLoraLinear

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
