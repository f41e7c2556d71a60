"""A lean inference forward for bitsandbytes' 4-bit linear layers on the CPU.

bitsandbytes' CPU path dequantizes the 4-bit weight into a new float32 tensor at every
call, through several layers of Python dispatch (autograd function, op registry, nested
absmax), then runs `F.linear`. On a decode step of the benchmark model that dispatch is
~5 of ~60 ms. `lean_4bit` calls the same C kernels, into one scratch buffer per thread,
then the same `F.linear`: the same numbers, less overhead. Where it does not apply (not
CPU, not float32, training, an unknown layout) bitsandbytes' own forward runs.

For inputs of few rows (decode steps) the fused kernel of `loramux.model.kernels` replaces
both: it dequantizes a few weight rows at a time into a buffer that stays in cache instead
of writing the whole float32 weight to memory and reading it back. `calibrate.fused_4bit_rows`
times both ways on the model's own layers at start-up and sets the row count up to which
the kernel runs (large prefills amortize the dequantize and keep MKL's matmul). Its
`with_lora` form adds a decode step's LoRA term in the same call (`Lean4bit.with_lora`,
handed to the LoRA layers that wrap these).

On AVX2 CPUs each weight is rewritten once, in place, into the kernel's panels' layout
(16 output rows stored k-major: `panels_4bit`), whose outer-product kernel ran 1.1-1.5x the
row tiles on SmolLM2's shapes and above MKL's float32 matmul up to 512 rows. bitsandbytes'
own forward cannot read that layout: calls that want gradients (or another dtype) dequantize
it with `dequantize_panels` and multiply with `F.linear`.

Double-quantized (nested) block scales are decoded once per layer and kept in float32
(buffer `lean_absmax`): decoding them again at every call was ~4% of a decode step. They
cost 4 bytes per 64 weights (1/8 of the 4-bit weight's bytes; counted in the model's
memory); the 8-bit nested scales stay as well, for bitsandbytes' own path.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

from loramux.model import kernels

log = logging.getLogger(__name__)

_KERNELS = {"nf4": "cdequantize_blockwise_cpu_nf4_fp32", "fp4": "cdequantize_blockwise_cpu_fp4_fp32"}


class _Scratch(threading.local):
    """Float32 buffers reused by every layer's dequantize on this thread (a prefill and
    a decode step run on two threads at once)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, numel: int) -> torch.Tensor:
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            # A normal tensor even when first made in inference mode: an inference tensor
            # could not be written in place by a later call outside that mode.
            with torch.inference_mode(False):
                buf = self.buffers[name] = torch.empty(numel, dtype=torch.float32)
        return buf[:numel]


_scratch = _Scratch()


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _lib():
    try:
        from bitsandbytes.cextension import lib
    except ImportError:
        return None
    names = (*_KERNELS.values(), "cdequantize_blockwise_cpu_fp32")
    return lib if all(hasattr(lib, n) for n in names) else None


def plain_input(x: torch.Tensor) -> bool:
    """An input the lean CPU paths take (here and the output head's): float32 on the CPU,
    no gradient wanted."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad)


def _eligible(module) -> bool:
    """The layouts the raw kernels take as they are (the C calls get bare pointers)."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    if qs is None or getattr(qs, "packing_format_for_cpu", False):
        return False
    floats = (qs.state2.absmax, qs.state2.code) if qs.nested else (qs.absmax,)
    return (module.weight.device.type == "cpu" and module.compute_dtype == torch.float32
            and qs.quant_type in _KERNELS and qs.blocksize < 2048 and len(qs.shape) == 2
            and qs.shape[1] % 2 == 0 and module.weight.dtype == torch.uint8 and module.weight.is_contiguous()
            and all(t.dtype == torch.float32 for t in floats)
            and all(t.is_contiguous() for t in (qs.absmax, *floats))
            and (module.bias is None or module.bias.dtype == torch.float32))


def _fusable(qs) -> bool:
    """The layouts the fused kernel takes: a 16-value code, rows and blocks of 16k weights."""
    return (qs.code.dtype == torch.float32 and qs.code.is_contiguous() and qs.code.numel() == 16
            and qs.blocksize % 16 == 0 and qs.shape[1] % 16 == 0)


def _absmax(qs, lib) -> torch.Tensor:
    """The per-block float32 scales; nested (double-quantized) ones are dequantized, into
    a new tensor that the layer keeps."""
    if not qs.nested:
        return qs.absmax
    with torch.inference_mode(False):
        out = torch.empty(qs.absmax.numel(), dtype=torch.float32)
    lib.cdequantize_blockwise_cpu_fp32(_ptr(qs.state2.code), _ptr(qs.absmax), _ptr(qs.state2.absmax), _ptr(out),
                                       ctypes.c_longlong(qs.state2.blocksize), ctypes.c_longlong(out.numel()))
    return out.add_(qs.offset)


class Lean4bit:
    """Owns which 4-bit products take the fused kernel: inputs of at most `fused_rows` rows
    (0: none, e.g. no compiler or no AVX2)."""

    def __init__(self, modules: list, fused: bool) -> None:
        self.modules = modules
        self.wide = kernels.isa() == "avx512"
        # Until measured (`calibrate.fused_4bit_rows`): decode-sized inputs, where the kernel
        # won on every CPU tried.
        self.fused_rows = 16 if fused and modules else 0
        # Per module: its product with a decode step's LoRA term in the same kernel call
        # (`with_lora`), for the LoRA layers that wrap it.
        self.with_lora: dict[object, Callable] = {}
        # Weights rewritten into the panels' layout (`kernels/linear_4bit.cpp`) for its AVX2
        # product, which ran 1.1-1.5x the row-tile kernel and above MKL's float32 matmul on
        # SmolLM2's shapes at 1-512 rows; AVX-512 CPUs keep the row-tile kernel's wide build.
        self.panels = bool(self.fused_rows) and kernels.isa() == "avx2"

    def first_block(self) -> list:
        """One layer of each shape, as the model's first block has them."""
        seen: dict[tuple[int, int], object] = {}
        for m in self.modules:
            seen.setdefault((m.in_features, m.out_features), m)
        return list(seen.values())


def _panels_fit(qs) -> bool:
    """The layouts `panels_4bit` takes: outputs in 16s, whole scale blocks per weight row."""
    rows, cols = qs.shape
    return _fusable(qs) and rows % 16 == 0 and cols % qs.blocksize == 0


def _to_panels(module, qs, absmax: torch.Tensor) -> torch.Tensor:
    """Rewrite `module`'s 4-bit weight in place into the panels' layout (the same bytes,
    reordered: no second copy of the weight); returns its block scales in that layout. The
    quant state remembers it (`loramux_panels`): a weight that another module or a second
    `lean_4bit` meets again is not reordered twice."""
    done = getattr(qs, "loramux_panels", None)
    if done is not None:
        return done
    with torch.no_grad():  # in place is allowed on either kind of tensor inside inference mode, if on
        packed, scales = torch.ops.loramux.panels_4bit(module.weight.data, absmax, qs.blocksize, qs.shape[0])
        module.weight.data.view(-1).copy_(packed)
        if not qs.nested:
            qs.absmax.copy_(scales)  # bitsandbytes' own scales, now in the same order as the weight
            scales = qs.absmax
    qs.loramux_panels = scales
    return scales


def _calls(qs, absmax: torch.Tensor, packed: torch.Tensor, panels: bool, lean: Lean4bit) -> tuple[Callable, Callable]:
    """The fused kernel's product and product-with-LoRA-term on rows `x2` of this weight, its
    operands bound once (resolving the op and its arguments at each of 210 calls a step cost
    a few us each)."""
    rows, code, blocksize = qs.shape[0], qs.code, qs.blocksize
    ops = torch.ops.loramux
    if panels:
        plain, lora = ops.linear_4bit_panels.default, ops.linear_4bit_panels_lora.default
        return (lambda x2: plain(x2, packed, absmax, code, blocksize, rows),
                lambda x2, *extra: lora(x2, packed, absmax, code, blocksize, rows, *extra))
    plain, lora = ops.linear_4bit.default, ops.linear_4bit_lora.default
    return (lambda x2: plain(x2, packed, absmax, code, blocksize, rows, lean.wide),
            lambda x2, *extra: lora(x2, packed, absmax, code, blocksize, rows, lean.wide, *extra))


def _lean_forward(module, fallback: Callable, lib, lean: Lean4bit) -> Callable:
    kernel = getattr(lib, _KERNELS[module.weight.quant_state.quant_type])
    # quant state, its float32 scales, packed weight, fusable, in the panels' layout, and the
    # fused kernel's two calls bound to them (`_calls`)
    kept: list = [None, None, None, False, False, ()]

    def state(qs) -> list:
        """What the current weight's products need, made again when a new weight (e.g. loaded
        again) brings a new quant state."""
        if kept[0] is not qs:
            absmax = _absmax(qs, lib) if qs.nested else qs.absmax
            panels = lean.panels and _panels_fit(qs)
            if panels:
                absmax = _to_panels(module, qs, absmax)
            if qs.nested:  # a buffer, so that the model's memory footprint (and its metric) counts them
                module.register_buffer("lean_absmax", absmax, persistent=False)
            # .data: a plain tensor; Params4bit would route the kernel call through its Python
            # __torch_function__ (a few us, 210 times a step).
            kept[:] = [qs, absmax, module.weight.data, _fusable(qs), panels,
                       _calls(qs, absmax, module.weight.data, panels, lean)]
        return kept

    state(module.weight.quant_state)  # now, not at the first request

    def fused(lora: int, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor | None:
        """The fused kernel on `x` (with the LoRA term of `extra` if `lora`), or None where it
        does not take it: more rows than `fused_rows`, or a layout it does not read."""
        qs = module.weight.quant_state
        st = kept if kept[0] is qs else state(qs)
        rows, cols = qs.shape
        if not st[3] or x.numel() > lean.fused_rows * cols:
            return None
        out = st[5][lora](x.reshape(-1, cols).contiguous(), *extra)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], rows)

    def dequantized(weight: torch.Tensor) -> torch.Tensor:
        """The float32 weight, written into `weight` [rows, cols] (bitsandbytes' dequantize)."""
        qs = module.weight.quant_state
        _, absmax, packed, _, panels, _ = state(qs)
        if panels:
            torch.ops.loramux.dequantize_panels(packed, absmax, qs.code, qs.blocksize, qs.shape[0], weight)
        else:
            kernel(_ptr(packed), _ptr(absmax), _ptr(weight), ctypes.c_longlong(qs.blocksize),
                   ctypes.c_longlong(qs.shape[0]), ctypes.c_longlong(qs.shape[1]))
        return weight

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not plain_input(x):
            if not state(module.weight.quant_state)[4]:
                return fallback(x)
            # bitsandbytes' forward cannot read the panels' layout: its own steps (input in the
            # compute dtype, output back in the input's), on a weight dequantized afresh, so
            # that gradients to x flow through F.linear.
            weight = dequantized(torch.empty(module.weight.quant_state.shape, dtype=torch.float32))
            return F.linear(x.to(torch.float32), weight, module.bias).to(x.dtype)
        out = fused(0, x)
        if out is not None:
            if module.bias is not None:
                out += module.bias
            return out
        # Dequantize into this thread's scratch, then MKL's matmul (bitsandbytes' way).
        rows, cols = module.weight.quant_state.shape
        return F.linear(x, dequantized(_scratch.get("weight", rows * cols).view(rows, cols)), module.bias)

    def with_lora(x: torch.Tensor, *lora: torch.Tensor) -> torch.Tensor | None:
        """`forward(x)` plus `lora_rows`' term (its arguments `a, bt, scaling, slots, ranks`) in
        one kernel call; None where that call does not apply (the caller adds the term itself).
        A bias would be added after the term, where PEFT adds it before: such layers say None."""
        if module.bias is not None or not plain_input(x):
            return None
        return fused(1, x, *lora)

    lean.with_lora[module] = with_lora
    return forward


def lean_4bit(model: torch.nn.Module, fused: bool = True) -> Lean4bit:
    """Give every eligible bitsandbytes 4-bit linear of `model` the lean forward (with the
    fused kernel for few rows if `fused` and it loads). Inference only: a call that needs
    gradients takes bitsandbytes' path."""
    lib = _lib()
    modules = [m for m in model.modules() if _eligible(m)] if lib is not None else []
    lean = Lean4bit(modules, fused and bool(modules) and kernels.load())
    for module in modules:
        module.forward = _lean_forward(module, module.forward, lib, lean)
    log.debug("lean 4-bit forward on %d layers", len(modules))
    return lean
