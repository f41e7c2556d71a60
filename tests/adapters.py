"""Building real PEFT adapters for tests and benchmarks (random weights, saved by PEFT)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_path: str | Path, out: str | Path, rank: int = 8,
                 targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 0,
                 alpha: float | None = None, use_rslora: bool = False, scale: float = 1.0) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for the model at base_path."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=list(targets),
                        lora_dropout=0.0, init_lora_weights=False, use_rslora=use_rslora,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(scale)
    model.save_pretrained(str(out), safe_serialization=True)
    return Path(out)
