"""Device slots as a table: residency, pinning and eviction after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loramux.errors import NotFound
from loramux.lora.layers import attach_stacked_lora
from loramux.lora.slots import AdapterSlots, SlotsFull
from loramux.lora.store import AdapterStore
from loramux.metrics import Metrics

IN, OUT = 8, 6


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(IN, OUT, bias=False)])

    def forward(self, x):
        return self.layers[0](x)


def write_adapter(folder: Path, rank: int, value: float) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(f'{{"peft_type": "LORA", "r": {rank}, "lora_alpha": {rank}}}')
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


@pytest.mark.parametrize(("adapters", "columns", "way"), [
    ("ab", 512, "all slots"),  # both slots used: the slot tensors' views, no copy
    ("a", 512, "stacked"),  # one slot of two: copy just that one
    ("ab", 0, "gathered"),
])
def test_every_way_gives_each_row_its_own_adapter(setup, monkeypatch, adapters, columns, way):
    from loramux.lora import layers

    model, ctx, slots, _ = setup
    monkeypatch.setattr(layers, "STACKED_MAX_COLUMNS", columns)
    monkeypatch.setattr(layers, "ALL_SLOTS_MIN_SHARE", 0.5)  # 2 adapters x rank 3: 6 of 8 columns
    x = torch.randn(4, 3, IN)
    acquired = [slots.acquire(name) for name in adapters]
    row_slots = [acquired[0], -1, acquired[-1], acquired[0]]
    ctx.set(row_slots, torch.device("cpu"))
    assert way == ("gathered" if ctx.onehot is None else "all slots" if ctx.uniq is None else "stacked")
    out = model(x)
    assert torch.allclose(out, reference(model, x, row_slots, ctx), atol=1e-5)
    ctx.set([-1] * 4, torch.device("cpu"))
    assert torch.equal(out[1], model(x)[1])  # the bare-base row is the base, bit for bit


@pytest.mark.parametrize("columns", [512, 0], ids=["stacked", "gathered"])
def test_an_adapter_that_overflows_harms_no_other_row(setup, tmp_path, monkeypatch, columns):
    """Finite but huge weights pass the file checks; their inf must stay in their own rows."""
    from loramux.lora import layers

    model, ctx, slots, _ = setup
    monkeypatch.setattr(layers, "STACKED_MAX_COLUMNS", columns)
    slots.store.add(slots.store.inspect("huge", write_adapter(tmp_path / "huge", rank=2, value=3e38), "rpc"))
    x = torch.randn(3, 2, IN)
    huge, sb = slots.acquire("huge"), slots.acquire("b")
    assert huge == 0  # the gathered way runs bare rows through slot 0 (times a scale of 0)
    ctx.set([-1, sb, -1], torch.device("cpu"))
    want = model(x)
    ctx.set([-1, sb, huge], torch.device("cpu"))
    got = model(x)
    assert not torch.isfinite(got[2]).all()  # the overflowing row itself
    # The other rows are untouched, up to rounding: with the huge adapter in the batch the
    # stacked way sums over more (zeroed) columns, which may reorder a float sum.
    assert torch.isfinite(got[:2]).all()
    torch.testing.assert_close(got[:2], want[:2])


def test_stacked_copies_follow_a_slot_loaded_again(setup):
    """Steps over the same slots reuse the stacked way's copies; a slot evicted and loaded
    with another adapter between two such steps must not leave the old adapter's copy."""
    model, ctx, slots, _ = setup
    x = torch.randn(2, 1, IN)
    s = slots.acquire("a")
    row_slots = [s, -1]  # one slot of two: the stacked way, which copies
    ctx.set(row_slots, torch.device("cpu"))
    assert ctx.uniq is not None and ctx.onehot is not None
    first = model(x)
    ctx.set(row_slots, torch.device("cpu"))
    assert torch.equal(model(x), first)  # copies reused: the same numbers
    slots.release("a")
    slots.acquire("b")  # takes the other slot; c then evicts a (least recent) from s
    assert slots.acquire("c") == s
    ctx.set(row_slots, torch.device("cpu"))
    assert torch.allclose(model(x), reference(model, x, row_slots, ctx), atol=1e-5)
