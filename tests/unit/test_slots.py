"""Device slots as a table: residency, pinning and eviction after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loramux.errors import FailedPrecondition, InvalidArgument, NotFound
from loramux.lora.layers import attach_stacked_lora
from loramux.lora.slots import AdapterSlots, SlotsFull
from loramux.lora.store import AdapterStore
from loramux.metrics import Metrics
from loramux.model import kernels

IN, OUT = 8, 6


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, OUT, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def write_adapter(folder: Path, rank: int, value: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": {rank}, "target_modules": ["layers.0"]}}')
    save_file({"base_model.model.layers.0.lora_A.weight": torch.full((rank, IN), value),
               "base_model.model.layers.0.lora_B.weight": torch.full((OUT, rank), 1.0)},
              str(folder / "adapter_model.safetensors"))
    return folder


@pytest.fixture
def setup(tmp_path):
    model = Toy()
    ctx, layers = attach_stacked_lora(model, num_slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    store = AdapterStore({n: (IN, OUT) for n in layers}, (tmp_path.resolve(),), 4, 1 << 20, torch.float32)
    for i, name in enumerate("abc"):
        store.add(store.inspect(name, write_adapter(tmp_path / name, rank=2 + i % 2, value=i + 1.0), "rpc"))
    metrics = Metrics()
    return model, ctx, AdapterSlots(store, layers, 2, 1 << 20, metrics), metrics


def test_lru_with_pinning(setup):
    model, ctx, slots, metrics = setup
    sa = slots.acquire("a")
    sb = slots.acquire("b")
    assert slots.resident() == {"a", "b"} and sa != sb
    with pytest.raises(SlotsFull):
        slots.acquire("c")  # both pinned: nothing may be evicted under a running request
    slots.release("a")
    assert slots.acquire("c") == sa  # a (idle, least recent) is evicted, its slot reused
    assert slots.resident() == {"b", "c"}
    slots.release("b")
    slots.release("c")
    assert slots.acquire("c") == sa  # hit
    assert slots.acquire("a") == sb  # b was least recently used
    assert (metrics.adapter_cache_misses._value.get(), metrics.adapter_cache_hits._value.get()) == (4, 1)
    assert metrics.adapter_evictions._value.get() == 2


def test_rows_use_their_own_slot(setup):
    model, ctx, slots, _ = setup
    x = torch.ones(3, 1, IN)
    base = model(x)
    s_a, s_b = slots.acquire("a"), slots.acquire("b")
    ctx.set([s_a, -1, s_b], torch.device("cpu"))
    out = model(x)
    # a: rank 2, A=1, B=1, scaling 1 -> +2*8 per output; b: rank 3, A=2 -> +3*16
    assert torch.allclose(out[0] - base[0], torch.full((1, OUT), 16.0))
    assert torch.equal(out[1], base[1])
    assert torch.allclose(out[2] - base[2], torch.full((1, OUT), 48.0))


def test_unregistered_while_pinned_frees_slot_on_release(setup):
    _, _, slots, _ = setup
    slots.acquire("a")
    slots.store.remove("a")
    slots.forget("a")
    assert "a" in slots.resident()  # still pinned by its running request
    slots.release("a")
    assert "a" not in slots.resident()
    with pytest.raises(NotFound):
        slots.acquire("a")


def reference(model, x, row_slots, ctx):
    """Each row alone: base + scaling * x A^T B^T, from the layer's own slot tensors."""
    layer = model.layers[0]
    rows = []
    for row, s in enumerate(row_slots):
        y = layer.base(x[row])
        if s >= 0:
            r = ctx.ranks[s]
            y = y + (x[row] @ layer.lora_a[s, :r].T @ layer.lora_bt[s, :r]) * layer.scaling[s]
        rows.append(y)
    return torch.stack(rows)


def force(ctx, way: str) -> None:
    """Make the plan take one way: direct (free), grouped (free, the direct way dear), or the
    fused kernel for decode steps (grouped costs for prompts; skipped where it cannot be built)."""
    costs = ctx.costs
    costs.direct, costs.group, costs.row_rank = (0.0, 1.0, 1.0) if way == "direct" else (1.0, 0.0, 0.0)
    ctx.kernel = None
    if way == "fused":
        if kernels.isa() is None or not kernels.load():
            pytest.skip("no AVX2 or no C++ compiler: no fused kernel")
        ctx.kernel = kernels.isa()


@pytest.mark.parametrize("way", ["direct", "grouped", "fused"])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("adapters", ["a", "ab"])
def test_every_way_gives_each_row_its_own_adapter(setup, way, tokens, adapters):
    model, ctx, slots, _ = setup
    force(ctx, way)
    x = torch.randn(4, tokens, IN)
    acquired = [slots.acquire(name) for name in adapters]
    row_slots = [acquired[0], -1, acquired[-1], acquired[0]]
    ctx.set(row_slots, torch.device("cpu"))
    out = model(x)
    plan = ctx.plan(tokens)
    if tokens > 1 and adapters == "ab":  # prompts of several adapters: the row-wise way, whatever the costs
        assert plan.row_slots.tolist() == [acquired[0], acquired[1], acquired[0]] and plan.rows.tolist() == [0, 2, 3]
        assert plan.gather is None and not plan.direct
    elif way == "fused" and tokens == 1:  # decode steps: one kernel call, every row's slot
        assert plan.row_slots.tolist() == row_slots and plan.slot_ranks.tolist() == ctx.ranks
        assert plan.gather is None and not plan.direct
    else:  # the fused kernel is for decode steps only: its prompts take the grouped way (its costs)
        direct = way == "direct"
        assert (plan.gather is None) == direct and bool(plan.direct) == direct
    assert torch.allclose(out, reference(model, x, row_slots, ctx), atol=1e-5)
    ctx.set([-1] * 4, torch.device("cpu"))
    assert torch.equal(out[1], model(x)[1])  # the bare-base row is the base, bit for bit


def test_one_adapter_on_every_row_takes_no_gather(setup):
    model, ctx, slots, _ = setup
    force(ctx, "direct")
    s = slots.acquire("b")
    x = torch.randn(3, 2, IN)
    ctx.set([s] * 3, torch.device("cpu"))
    out = model(x)
    assert ctx.plan(2).direct == [(s, None, 3)]
    assert torch.allclose(out, reference(model, x, [s] * 3, ctx), atol=1e-5)


def test_slot_tensors_wait_for_an_adapter_that_targets_the_layer(tmp_path):
    model = Toy()
    _, layers = attach_stacked_lora(model, num_slots=2, max_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    layer = layers["layers.0"]
    assert layer.lora_a is None and not list(layer.buffers())  # nothing to pay for yet
    layer.load_slot(1, torch.ones(2, IN), torch.ones(2, OUT), 0.5)
    assert layer.lora_a.shape == (2, 4, IN) and layer.lora_bt.shape == (2, 4, OUT)


@pytest.mark.parametrize(("way", "tokens"), [("direct", 1), ("grouped", 1), ("direct", 2), ("fused", 1)],
                         ids=["direct", "grouped", "row-wise", "fused"])  # 2 tokens of 2 adapters: row-wise
@pytest.mark.parametrize("bare", [True, False])
def test_an_adapter_that_overflows_harms_no_other_row(setup, tmp_path, way, tokens, bare):
    """Finite but huge weights pass the file checks; their inf must stay in their own rows."""
    model, ctx, slots, _ = setup
    force(ctx, way)
    slots.store.add(slots.store.inspect("huge", write_adapter(tmp_path / "huge", rank=2, value=3e38), "rpc"))
    x = torch.randn(3, tokens, IN)
    x[2] = 1.0  # its row overflows for sure (a random one may sum to less than 1)
    huge, sb = slots.acquire("huge"), slots.acquire("b")
    first = -1 if bare else sb
    ctx.set([first, sb, -1], torch.device("cpu"))
    want = model(x)
    ctx.set([first, sb, huge], torch.device("cpu"))
    got = model(x)
    assert (ctx.plan(tokens).row_slots is not None) == (tokens > 1 or way == "fused")
    assert not torch.isfinite(got[2]).all()  # the overflowing row itself
    assert torch.isfinite(got[:2]).all()
    torch.testing.assert_close(got[:2], want[:2])


def test_a_slot_loaded_again_is_used_at_once(setup):
    """A slot evicted and loaded with another adapter between two steps must not leave the
    old adapter's numbers anywhere."""
    model, ctx, slots, _ = setup
    x = torch.randn(2, 1, IN)
    s = slots.acquire("a")
    row_slots = [s, -1]
    ctx.set(row_slots, torch.device("cpu"))
    model(x)
    slots.release("a")
    slots.acquire("b")  # takes the other slot; c then evicts a (least recent) from s
    assert slots.acquire("c") == s
    ctx.set(row_slots, torch.device("cpu"))
    assert torch.allclose(model(x), reference(model, x, row_slots, ctx), atol=1e-5)


def test_a_smaller_adapter_in_a_slot_leaves_no_row_of_the_larger_one(setup):
    """Slots are loaded with batched copies of the adapter's rows only: rows a larger adapter
    wrote before must read zero (the grouped way reads up to the batch's largest rank), both
    when the slot is evicted first and when it is loaded over."""
    model, ctx, slots, _ = setup
    layer = slots.layers["layers.0"]
    s = slots.acquire("b")  # rank 3
    slots.release("b")
    slots.acquire("c")  # the other slot (rank 2)
    assert slots.acquire("a") == s  # rank 2, where b was
    assert layer.written[s] == 2 and layer.scales[s] == float(layer.scaling[s]) == pytest.approx(1.0)
    assert torch.equal(layer.lora_a[s, :2], torch.full((2, IN), 1.0))
    assert not layer.lora_a[s, 2:].any() and not layer.lora_bt[s, 2:].any()
    layer.load_slot(s, torch.full((4, IN), 2.0), torch.full((4, OUT), 2.0), 0.5)
    layer.load_slot(s, torch.full((1, IN), 3.0), torch.full((1, OUT), 3.0), 0.25)  # over it, no wipe between
    assert layer.written[s] == 1 and float(layer.scaling[s]) == layer.scales[s] == 0.25
    assert not layer.lora_a[s, 1:].any() and not layer.lora_bt[s, 1:].any()
    layer.load_slot(s, None, None, 0.0)
    assert not layer.lora_a[s].any() and not layer.lora_bt[s].any() and float(layer.scaling[s]) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_that_are_not_finite_are_refused_by_name(setup, tmp_path, bad):
    _, _, slots, _ = setup
    slots.store.add(slots.store.inspect("bad", write_adapter(tmp_path / "bad", rank=2, value=bad), "rpc"))
    with pytest.raises(InvalidArgument, match="layers.0 holds NaN or infinite values"):
        slots.store.load_weights(slots.store.get("bad"))
    with pytest.raises(FailedPrecondition, match="cannot be loaded"):
        slots.acquire("bad")
    assert slots.acquire("a") >= 0  # the slot it would have taken is free again
