"""Llama's RMSNorm through one kernel call on the CPU.

transformers' `LlamaRMSNorm.forward` is seven tensor ops (a cast, pow, mean, add, rsqrt and
two products), each a few microseconds of dispatch on a decode step's few dozen rows, 61
times a SmolLM2 step. `lean_norms` gives those modules `torch.ops.loramux.rms_norm`
(`kernels/norm.cpp`): the same float32 products, the mean's sum in another order. Only the
classes known to compute exactly Llama's norm take it (Gemma's, say, adds 1 to its weight);
an input that is not plain float32 on the CPU, or wants gradients, takes the module's own
forward.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable

import torch

from loramux.model import kernels
from loramux.model.quant import plain_input

log = logging.getLogger(__name__)


def _llama_norms() -> tuple[type, ...]:
    """RMSNorm classes whose forward is Llama's, as transformers copies it between models."""
    classes = []
    for module, name in (("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("qwen2", "Qwen2RMSNorm")):
        try:
            classes.append(getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def _forward(module: torch.nn.Module, fallback: Callable) -> Callable:
    weight, eps, op = module.weight, float(module.variance_epsilon), torch.ops.loramux.rms_norm.default

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not plain_input(x) or weight.dtype != torch.float32 or (weight.requires_grad and torch.is_grad_enabled()):
            return fallback(x)
        return op(x.contiguous(), weight, eps)
    return forward


def lean_norms(model: torch.nn.Module) -> int:
    """Give `model`'s Llama-style RMSNorm modules the kernel's forward (where the CPU kernels
    load and the model computes on the CPU); how many took it."""
    if kernels.isa() is None or not kernels.load():
        return 0
    classes = _llama_norms()
    norms = [m for m in model.modules() if isinstance(m, classes) and m.weight.device.type == "cpu"]
    for module in norms:
        module.forward = _forward(module, module.forward)
    log.debug("RMSNorm kernel on %d modules", len(norms))
    return len(norms)
