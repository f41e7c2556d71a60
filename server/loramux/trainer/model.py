"""The base model for training (quantized for QLoRA unless told otherwise) wrapped in a fresh LoRA."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch

from loramux.model.loader import honour_compute_dtype, quantization_config, resolve_dtype, resolve_model_path
from loramux.trainer.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its device, compute dtype and the base's resolved path."""

    path: str
    device: torch.device
    dtype: torch.dtype


def placement(cfg: TrainConfig) -> Placement:
    """One device per process: under torchrun / accelerate each rank takes its local GPU."""
    from accelerate import PartialState

    if cfg.device == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", PartialState().local_process_index)
        else:
            device = torch.device("cpu")
    else:
        device = torch.device(cfg.device)
    return Placement(resolve_model_path(cfg.model), device, resolve_dtype(cfg.compute_dtype, device))


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    # bias="none" and no modules_to_save: what the server accepts.
    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def load_for_training(cfg: TrainConfig, where: Placement):
    """Return the PEFT model: base frozen (and quantized), LoRA weights trainable in float32."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            where.path, dtype=where.dtype, device_map={"": where.device},
            quantization_config=quantization_config(cfg.quantization, where.dtype),
        )
    base.config.use_cache = False  # caches are for generation; they only cost memory here
    gc_kwargs = {"use_reentrant": False}
    if cfg.quantization != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing and hasattr(base, "activation_checkpointing_enable"):  # transformers 5
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=gc_kwargs)
    elif cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    honour_compute_dtype(base, where.dtype)
    missing = [m for m in cfg.target_modules if not any(n.endswith("." + m) for n, _ in base.named_modules())]
    if missing:
        raise ValueError(f"--target-modules {', '.join(missing)}: no such layer in {where.path}")
    model = get_peft_model(base, lora_config(cfg))
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA rank %d on %s: %d trainable parameters (%.3f%% of %d)", cfg.rank,
             ",".join(cfg.target_modules), trainable, 100 * trainable / total, total)
    return model
