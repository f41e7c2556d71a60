"""The lean 4-bit forward gives bitsandbytes' own numbers: bit for bit where it dequantizes
then multiplies as bitsandbytes does, to float32 rounding where the fused kernel runs."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from loramux.model import kernels, quant
from loramux.model.calibrate import fused_4bit_rows
from loramux.model.quant import lean_4bit

ISAS = [isa for isa in ("avx2", "avx512") if kernels.isa() == "avx512" or isa == kernels.isa()]


def quantized(quant_type: str, nested: bool, out_features: int, in_features: int,
              bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=nested, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    layer.support_avx512bf16_for_cpu = False  # as the loader keeps it (model.loader.honour_compute_dtype)
    return layer.to("cpu")  # quantizes


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_lean_forward_equals_bitsandbytes(quant_type, nested):
    layer = quantized(quant_type, nested, 384, 256)
    x = [torch.randn(rows, 3, 256) for rows in (1, 25)]
    with torch.inference_mode():
        expected = [layer(t) for t in x]
        lean = lean_4bit(layer)
        assert len(lean.modules) == 1
        lean.fused_rows = 0  # bitsandbytes' way, without its dispatch
        quant._scratch.buffers.clear()
        got = [layer(t) for t in x]
        assert "weight" in quant._scratch.buffers  # the lean path ran, not a fallback
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


def test_training_gets_gradients_and_bitsandbytes_numbers():
    layer = quantized("nf4", True, 64, 64)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    want_out, want_grad = layer(x).detach(), x.grad.clone()
    x.grad = None
    lean_4bit(layer)  # the weight may now be in the panels' layout, which bitsandbytes cannot read
    out = layer(x)
    out.sum().backward()  # the lean fused path has no backward: a call that wants gradients dequantizes
    assert torch.equal(out.detach(), want_out)
    torch.testing.assert_close(x.grad, want_grad)


@pytest.mark.skipif(kernels.isa() != "avx2" or not kernels.load(), reason="the panels' layout is AVX2's")
def test_panels_rewrite_the_weight_in_place():
    layer, ragged = quantized("nf4", True, 96, 64), quantized("nf4", False, 40, 64)
    before = [(m.weight.data.data_ptr(), m.weight.data.clone()) for m in (layer, ragged)]
    lean = lean_4bit(torch.nn.Sequential(layer, ragged))
    assert lean.panels
    # The same bytes in the same storage, reordered: no second copy of the 4-bit weight.
    assert layer.weight.data.data_ptr() == before[0][0] and not torch.equal(layer.weight.data, before[0][1])
    # 40 outputs are not whole panels of 16: that layer keeps bitsandbytes' layout.
    assert torch.equal(ragged.weight.data, before[1][1])
    x = torch.randn(3, 64)
    with torch.inference_mode():
        lean.fused_rows = 3
        fast = layer(x)
        lean.fused_rows = 0  # dequantized from the panels, then MKL's matmul
        dense = layer(x)
        # A second lean forward over the same weight (another runner on this model) reads the
        # panels as they are: reordering them again would scramble the weight.
        again = lean_4bit(layer)
        again.fused_rows = 3
        assert torch.equal(layer(x), fast)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)


def test_scratch_made_in_inference_mode_serves_calls_outside_it():
    layer = quantized("nf4", True, 64, 64)
    lean_4bit(layer)
    quant._scratch.buffers.clear()
    x = torch.randn(2, 64)
    with torch.inference_mode():
        first = layer(x)
    with torch.no_grad():
        assert torch.equal(layer(x), first)


def test_new_weight_brings_its_own_block_scales():
    layer, other = quantized("nf4", True, 64, 64), quantized("nf4", True, 64, 64)
    with torch.no_grad():
        other.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64)
    with torch.inference_mode():
        expected = other(x)
        lean_4bit(layer).fused_rows = 0  # bitsandbytes' own numbers, bit for bit
        assert layer.lean_absmax.numel() == 64 * 64 // layer.weight.quant_state.blocksize  # kept, counted
        layer(x)
        layer.weight = other.weight
        assert torch.equal(layer(x), expected)


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_fused_kernel_equals_bitsandbytes_to_rounding(isa, quant_type, nested):
    # 400 outputs: full tiles and a ragged last one; rows 1-37 cover every row-block tail.
    layer = quantized(quant_type, nested, 400, 320)
    lean = lean_4bit(layer)
    lean.wide = isa == "avx512"
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 7, 16, 37):
            x = torch.randn(rows, 320)
            lean.fused_rows = 0
            quant._scratch.buffers.clear()
            expected = layer(x)
            lean.fused_rows = rows
            quant._scratch.buffers.clear()
            got = layer(x)
            assert "weight" not in quant._scratch.buffers  # the kernel ran, not the dequantize
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            # A batch's rows are independent: row i alone gives the same numbers bit for bit.
            assert torch.equal(layer(x[:1]), got[:1])


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
def test_fused_rows_calibrated_on_the_layers():
    layer = quantized("nf4", True, 256, 256)
    lean = lean_4bit(layer)
    assert lean.fused_rows == 16  # until measured
    rows = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert fused_4bit_rows(lean, rows, repeat=1) == lean.fused_rows
    assert lean.fused_rows in (0, *rows)
    x = torch.randn(lean.fused_rows + 1, 256)
    quant._scratch.buffers.clear()
    with torch.inference_mode():
        layer(x)
    assert "weight" in quant._scratch.buffers  # more rows than chosen: dequantize, then MKL


def test_fused_kernel_off_keeps_bitsandbytes_way():
    layer = quantized("nf4", True, 64, 64)
    assert lean_4bit(layer, fused=False).fused_rows == 0


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
def test_fused_kernel_keeps_the_calling_threads_team_size():
    # The server's engine thread sets its own team size; its other threads then go single-
    # threaded. A kernel call must not reset the engine's team to that last count (torch's
    # per-thread lazy init, had it been compiled into the kernel, did: decode on one core).
    import threading

    from loramux.model.threads import set_threads

    layer = quantized("nf4", True, 256, 256)
    lean_4bit(layer)
    started, seen = threading.Event(), []

    def engine() -> None:
        set_threads(2)
        started.set()
        threading.Event().wait(0.2)  # meanwhile another thread goes single-threaded
        with torch.inference_mode():
            layer(torch.randn(1, 256))
        seen.append(torch.get_num_threads())

    thread = threading.Thread(target=engine)
    thread.start()
    started.wait()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    thread.join()
    torch.set_num_threads(before)
    assert seen == [2]


def lora_operands(slots: int, rank: int, d_in: int, d_out: int) -> tuple[torch.Tensor, ...]:
    """Stacked A, B^T and scalings of `slots` slots; slot 2 empty (rank 0), slot 1 of rank 3
    with stale non-zero rows above it (a larger adapter's, which must not count)."""
    torch.manual_seed(1)
    a, bt = torch.randn(slots, rank, d_in), torch.randn(slots, rank, d_out)
    a[2], bt[2] = 0, 0
    ranks = torch.tensor([rank, 3, 0] + [rank - i % 3 for i in range(3, slots)])
    return a, bt, 0.5 + torch.rand(slots), ranks


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])  # one thread: no parallel region; two: split, with a barrier
def test_product_with_the_lora_term_equals_the_two_calls(isa, threads):
    layer = quantized("nf4", True, 400, 320, bias=False)
    lean = lean_4bit(layer)
    lean.wide, lean.fused_rows = isa == "avx512", 64
    a, bt, scaling, ranks = lora_operands(6, 8, 320, 400)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in ([0] * 37, [1, -1, 3, 3, 0, 4, 4, 4, 4, 4, 5, 1], [-1] * 5, [2, 2], [5]):
            x, slots = torch.randn(len(rows), 320), torch.tensor(rows)
            with torch.inference_mode():
                want = layer(x)  # the 4-bit kernel (rows <= fused_rows), then the LoRA kernel
                torch.ops.loramux.lora_rows(x, want, a, bt, scaling, slots, ranks, lean.wide)
                got = lean.with_lora[layer](x, a, bt, scaling, slots, ranks)
            assert torch.equal(got, want), rows  # the same sums in the same order
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
def test_product_with_the_lora_term_only_where_it_applies():
    lora = lora_operands(3, 4, 64, 64)
    slots = torch.tensor([0, 1])
    layer = quantized("nf4", True, 64, 64, bias=False)
    lean = lean_4bit(layer)
    lean.fused_rows = 1
    with torch.inference_mode():
        assert lean.with_lora[layer](torch.randn(2, 64), *lora[:3], slots, lora[3]) is None  # rows for MKL
        lean.fused_rows = 2
        assert lean.with_lora[layer](torch.randn(2, 64), *lora[:3], slots, lora[3]) is not None
        biased = quantized("nf4", True, 64, 64)
        lean = lean_4bit(biased)
        # PEFT adds the bias before the term: a bias after it would round differently.
        assert lean.with_lora[biased](torch.randn(2, 64), *lora[:3], slots, lora[3]) is None


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
def test_lora_layer_over_a_4bit_base_takes_the_one_call():
    from loramux.lora.layers import LoraCosts, RowSlots, StackedLoraLinear

    layer = quantized("nf4", True, 96, 64, bias=False)
    lean = lean_4bit(layer)
    ctx = RowSlots([0] * 4, 8, LoraCosts(), kernel=kernels.isa())
    lora = StackedLoraLinear(layer, 4, 8, ctx, torch.float32, torch.device("cpu"))
    torch.manual_seed(2)
    for slot, rank in {0: 8, 3: 2}.items():
        lora.load_slot(slot, torch.randn(rank, 64), torch.randn(rank, 96), 0.5)
        ctx.ranks[slot] = rank
    calls = []
    lora.with_lora = lambda *args: calls.append(1) or lean.with_lora[layer](*args)
    rows = [3, -1, 0, 0, 3]
    x = torch.randn(len(rows), 1, 64)
    ctx.set(rows, torch.device("cpu"))
    with torch.inference_mode():
        got = lora(x)
        want = layer(x)
        for i, slot in enumerate(rows):
            if slot >= 0:
                r = ctx.ranks[slot]
                want[i, 0] += 0.5 * (x[i, 0] @ lora.lora_a[slot, :r].T @ lora.lora_bt[slot, :r])
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not ISAS or not kernels.load(), reason="no AVX2 or no C++ compiler: no fused kernel")
@pytest.mark.parametrize("fused_lora", [True, False])
def test_runner_hands_its_lora_layers_the_kernels_one_call(base_path, fused_lora):
    from loramux.model.loader import ModelSpec, load_base
    from loramux.model.runner import Runner

    cpu = torch.device("cpu")
    model, tok = load_base(ModelSpec(str(base_path), "nf4", cpu, torch.float32))
    runner = Runner(model, tok, num_slots=2, max_rank=8, device=cpu, dtype=torch.float32, fused_lora=fused_lora)
    linked = [layer for layer in runner.layers.values() if layer.with_lora is not None]
    if fused_lora:  # every 4-bit layer the lean forward took
        assert len(linked) == len(runner.lean.modules) > 0
        assert all(layer.with_lora is runner.lean.with_lora[layer.base] for layer in linked)
    else:
        assert not linked and runner.ctx.kernel is None
