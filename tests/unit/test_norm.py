"""Llama's RMSNorm through the kernel gives transformers' numbers to float32 rounding, only
where it applies."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loramux.model import kernels
from loramux.model.norm import lean_norms

needs_kernels = pytest.mark.skipif(kernels.isa() is None or not kernels.load(), reason="no AVX2 or no compiler")


def norm(hidden: int) -> LlamaRMSNorm:
    torch.manual_seed(0)
    module = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        module.weight.copy_(torch.rand(hidden) + 0.5)
    return module


@needs_kernels
@pytest.mark.parametrize("hidden", [576, 100])  # 100: a tail past the last full vector
@pytest.mark.parametrize("rows", [1, 28, 300])  # 300: split over the threads
def test_kernel_equals_transformers_to_rounding(hidden, rows):
    module = norm(hidden)
    x = torch.randn(rows, 1, hidden) * 3
    with torch.inference_mode():
        want = module(x)
        assert lean_norms(torch.nn.Sequential(module)) == 1
        got = module(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)


@needs_kernels
def test_gradients_and_other_norms_keep_their_forward():
    module, other = norm(64), torch.nn.RMSNorm(64)
    forward = other.forward
    assert lean_norms(torch.nn.Sequential(module, other)) == 1  # torch's own RMSNorm is not Llama's class
    assert other.forward == forward
    x = torch.randn(2, 64, requires_grad=True)
    module(x).sum().backward()  # the kernel has no backward; transformers' forward does
    assert x.grad is not None and module.weight.grad is not None
