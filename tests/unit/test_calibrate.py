"""The cost model's constants come from timing, on the served model's own shapes."""

from __future__ import annotations

import time

import torch

from loramux.model.calibrate import forward_cost_tokens, lora_costs


def test_forward_cost_is_the_fixed_time_in_tokens_worth():
    def prefill(prompts: list[list[int]]) -> None:  # 20 ms per forward + 1 ms per token
        time.sleep(0.020 + 0.001 * len(prompts[0]))

    cost = forward_cost_tokens(prefill, token=0, device=torch.device("cpu"), short=4, long=24)
    assert 15 <= cost <= 25


def test_lora_costs_are_positive_and_grouped_rows_cost_less_than_an_adapter():
    shapes = [(64, 64), (64, 176), (176, 64)]
    c = lora_costs(shapes, num_slots=8, rank=8, dtype=torch.float32, device=torch.device("cpu"))
    assert c.direct > 0 and c.group > 0 and c.row_rank >= 0
    # One more row of rank 8 in the grouped way is cheaper than one more direct adapter:
    # what makes many small adapters take the grouped way.
    assert 8 * c.row_rank < c.direct
