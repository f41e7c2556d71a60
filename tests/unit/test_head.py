"""The output head through loramux's kernel or oneDNN gives the head's own product to float32 rounding, only
where it applies, and only where start-up timing kept it."""

from __future__ import annotations

import pytest
import torch

from loramux.model.calibrate import dense_head_rows
from loramux.model.head import DenseHead

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def head(out_features: int = 1000, in_features: int = 64, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(in_features, out_features, bias=bias)


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_faster_product_equals_the_linear_to_rounding(bias):
    layer = head(bias=bias)
    x = torch.randn(5, 1, 64)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
        dense = DenseHead(layer)
        assert dense.op is not None
        dense.rows = 0  # not measured yet: the module's own forward, bit for bit
        assert torch.equal(layer(x), expected)
        dense.rows = 5
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_more_rows_than_measured_take_the_linear():
    layer = head()
    dense = DenseHead(layer)
    dense.rows = 4
    x = torch.randn(5, 64)
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight))


@needs_onednn
def test_training_keeps_the_linear():
    layer = head()
    DenseHead(layer).rows = 64
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()  # oneDNN's op has no backward; the module's own has
    assert x.grad is not None and layer.weight.grad is not None


@needs_onednn
def test_kernel_where_it_loads_onednn_where_the_shape_does_not_fit():
    from loramux.model import kernels

    assert DenseHead(head()).name == ("loramux's kernel" if kernels.load() else "oneDNN")
    odd = head(in_features=72)  # not a multiple of 16: the kernel's loops do not take it
    dense = DenseHead(odd)
    dense.rows = 5
    x = torch.randn(5, 72)
    assert dense.name == "oneDNN"
    with torch.inference_mode():
        torch.testing.assert_close(odd(x), torch.nn.functional.linear(x, odd.weight), rtol=1e-5, atol=1e-5)


def test_heads_it_does_not_take_keep_their_forward():
    bf16 = head().to(torch.bfloat16)
    forward = bf16.forward
    assert DenseHead(bf16).op is None and bf16.forward == forward
    assert DenseHead(None).op is None and DenseHead(None).rows == 0


def test_calibration_keeps_onednn_only_up_to_a_measured_row_count():
    dense = DenseHead(head(4096, 128))
    rows = dense_head_rows(dense, rows=(1, 8, 32), repeat=2)
    assert rows in (0, 1, 8, 32) and dense.rows == rows
    if dense.op is None:
        assert rows == 0


def test_runner_takes_the_models_output_head(base_path):
    from loramux.model.loader import ModelSpec, load_base
    from loramux.model.runner import Runner

    cpu = torch.device("cpu")
    model, tok = load_base(ModelSpec(str(base_path), "nf4", cpu, torch.float32))
    runner = Runner(model, tok, num_slots=2, max_rank=8, device=cpu, dtype=torch.float32)
    assert runner.head.module is model.get_output_embeddings()
    assert (runner.head.op is not None) == torch.backends.mkldnn.is_available()
