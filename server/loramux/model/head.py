"""The output head's float32 product on the CPU through loramux's kernel or oneDNN instead
of MKL's GEMM.

A decode step multiplies a few dozen hidden states by the whole output head (SmolLM2:
49,152 x 576, 113 MB of float32, tied to the input embeddings). `F.linear` sends that
skinny product to MKL, which on the 2-core EPYC ran it at ~50 GFLOPS: 29-37 ms of a
~160 ms 32-row step. oneDNN's linear, which torch ships for its compiler's CPU fusions,
took 15 ms on the same plain weight (no packed copy, so no extra memory) and 5.7 against
11.4 ms for a lone row. The sums run in another order, so logits differ from MKL's in the
last float32 bits, as they do between batch sizes in any GEMM.

Where loramux's kernels load, their `linear_f32` (`kernels/linear_4bit.cpp`: the 4-bit
kernel's row tiles on the plain weight, read in place) replaces oneDNN: on SmolLM2's head it
ran 1.2x oneDNN at 28-32 rows and 1.3-1.5x at 4-8 (15.0 against 17.5 ms at 32 rows).

`dense_head_rows` (calibrate) times the chosen way against the module's own forward on the
model's own head at start-up and keeps it only where it wins; a build without either op, a
non-float32 or non-CPU head, or a call that wants gradients takes the module's own forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loramux.model import kernels
from loramux.model.quant import plain_input


def _onednn() -> Callable | None:
    """torch's oneDNN linear (`mkldnn::_linear_pointwise`), None where this build lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def _op(module: torch.nn.Module) -> tuple[str, Callable | None]:
    """The faster product for this head and its name: loramux's kernel where it loads and
    takes the shape, else oneDNN's linear (None where this build lacks it). Both are called
    as oneDNN's op is."""
    if module.in_features % 16 == 0 and kernels.load():
        wide = kernels.isa() == "avx512"

        def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *_) -> torch.Tensor:
            out = torch.ops.loramux.linear_f32(x.reshape(-1, x.shape[-1]), weight, wide)
            if bias is not None:
                out += bias
            return out.view(*x.shape[:-1], weight.shape[0])
        return "loramux's kernel", linear
    return "oneDNN", _onednn()


class DenseHead:
    """Owns whether the output head's product takes the faster op (`_op`, named `name`):
    inputs of at most `rows` rows (0: never, e.g. neither op in this build, or it lost to MKL
    at start-up)."""

    def __init__(self, module: torch.nn.Module | None) -> None:
        self.module = module
        self.name, self.op = _op(module) if _eligible(module) else ("", None)
        self.rows = 0  # until measured (`calibrate.dense_head_rows`)
        if self.op is not None:
            module.forward = self._forward(module.forward)

    def _forward(self, fallback: Callable) -> Callable:
        weight, bias, op = self.module.weight, self.module.bias, self.op

        def forward(x: torch.Tensor) -> torch.Tensor:
            if (x.numel() > self.rows * x.shape[-1] or not plain_input(x)
                    or (torch.is_grad_enabled() and weight.requires_grad)):
                return fallback(x)
            return op(x.contiguous(), weight, bias, "none", [], "")
        return forward


def _eligible(module: torch.nn.Module | None) -> bool:
    """A plain float32 linear on the CPU."""
    return (isinstance(module, torch.nn.Linear) and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and module.weight.is_contiguous()
            and (module.bias is None or module.bias.dtype == torch.float32))
