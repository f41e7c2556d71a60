"""Loading the base model: local folder or hub id, quantized with bitsandbytes."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSpec:
    """Where the base comes from and how to place it."""

    model: str | None
    quantization: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    # bf16 is slow on CPUs without AMX, and NF4 compute on CPU is tested in float32.
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


DEFAULT_MODEL = "smollm2-135m-instruct"


def named_models() -> list[str]:
    from loramux.model.gguf import GGUF_MODELS
    from loramux.model.tiny import SPECS

    return [*GGUF_MODELS, *SPECS]


def resolve_model_path(model: str | None) -> str:
    """A named model (None: the default one), built once into the cache folder, or a folder
    or hub id as given."""
    from loramux.model.cache import default_cache_dir
    from loramux.model.gguf import GGUF_MODELS, ensure_gguf_model
    from loramux.model.tiny import SPECS, ensure_tiny_model

    model = model or DEFAULT_MODEL
    if model in GGUF_MODELS:
        return str(ensure_gguf_model(model, default_cache_dir()))
    if model in SPECS:
        return str(ensure_tiny_model(model))
    return model


def quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_base(spec: ModelSpec):
    """Return (model, tokenizer) in eval mode on `spec.device`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(spec.model)
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=spec.dtype,
            quantization_config=quantization_config(spec.quantization, spec.dtype),
            device_map={"": spec.device},
        )
    model.eval()
    model.requires_grad_(False)
    honour_compute_dtype(model, spec.dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    log.info("base model %s (%s, %s on %s): %.1f MiB", Path(path).name, spec.quantization,
             str(spec.dtype).removeprefix("torch."), spec.device, model.get_memory_footprint() / 2**20)
    return model, tokenizer


def honour_compute_dtype(model, dtype) -> None:
    """Keep bitsandbytes' 4-bit layers computing in `dtype` on CPUs with AVX512-BF16.

    There bitsandbytes repacks the weights at the first eval forward and runs a fused
    kernel that rounds activations to bfloat16 whatever the compute dtype asks for. That
    rounding turns 1-ulp differences (from batching) into different tokens, so with a
    float32 compute dtype we keep its dequantize-then-matmul path, which is float32.
    """
    if dtype != torch.float32:
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
