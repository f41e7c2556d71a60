"""The lean 4-bit forward gives bitsandbytes' own numbers, bit for bit."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from loramux.model import quant
from loramux.model.quant import lean_4bit


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
        assert lean_4bit(layer) == 1
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
        lean_4bit(layer)
        assert layer.lean_absmax.numel() == 64 * 64 // layer.weight.quant_state.blocksize  # kept, counted
        layer(x)
        layer.weight = other.weight
        assert torch.equal(layer(x), expected)
