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


def quantized(quant_type: str, nested: bool, out_features: int, in_features: int) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Linear(in_features, out_features, bias=True)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
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


def test_training_keeps_the_bitsandbytes_path():
    layer = quantized("nf4", True, 64, 64)
    lean_4bit(layer)
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # the lean path has no backward; bitsandbytes' has
    assert x.grad is not None and x.grad.abs().sum() > 0


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
