"""`loramux merge`: fold a LoRA adapter into its base, for serving without loramux.

The base is loaded unquantized: merging into 4-bit weights would round the sum back to 4 bits
and lose most of the adapter. The result is a plain model folder (safetensors and tokenizer).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

from loramux.model.loader import DTYPES, named_models, resolve_model_path

log = logging.getLogger(__name__)


def check_adapter_folder(adapter: Path) -> None:
    """Refuse what the server would refuse: no config, or pickled weights."""
    if not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"{adapter}: no adapter_config.json (not a PEFT adapter folder)")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise ValueError(f"{adapter}: no adapter_model.safetensors (pickled .bin weights are refused)")


def trained_base(adapter: Path) -> str | None:
    """The named model the adapter's training card says it was trained on, if any."""
    card = adapter / "training_card.json"
    try:
        base = json.loads(card.read_text()).get("base_model") if card.is_file() else None
    except (OSError, ValueError):
        return None
    return base if base in named_models() else None


def merge(adapter: str | Path, out: str | Path, model: str | None = None, dtype: str = "float32",
          device: str = "cpu", overwrite: bool = False) -> Path:
    """Save base + adapter merged into `out`; return `out`. `model` None: the named model of the
    adapter's training card, else the default model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, out = Path(adapter), Path(out)
    check_adapter_folder(adapter)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out} is not empty; pass --overwrite to write into it")
    if out.resolve() == adapter.resolve():
        raise ValueError("--out must differ from --adapter")
    path = resolve_model_path(model or trained_base(adapter))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], device_map={"": torch.device(device)})
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(path).save_pretrained(str(out))
    log.info("merged %s into %s (%s): %s", adapter, path, dtype, out)
    return out
