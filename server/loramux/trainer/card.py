"""`training_card.json`: what an adapter was trained from and how, written next to its weights."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from loramux.model.gguf import sha256_file
from loramux.model.loader import DEFAULT_MODEL
from loramux.trainer.config import TrainConfig

CARD_FILE = "training_card.json"
RUN_FILE = "loramux-run.json"  # in --out/checkpoints: what a resumed run needs from the first one


def write_json(path: Path, payload: dict) -> None:
    """Write through a temporary file so that a reader never sees half a card."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def eval_history(log_history: list[dict]) -> list[dict]:
    """[{step, eval_loss}] from the Trainer's log, in step order."""
    return [{"step": e["step"], "eval_loss": e["eval_loss"]} for e in log_history if "eval_loss" in e]


def last_train_loss(log_history: list[dict]) -> float | None:
    losses = [e["loss"] for e in log_history if "loss" in e]
    return losses[-1] if losses else None


def file_info(path: Path, examples: list) -> dict:
    """Where a dataset came from: path, sha256, example count by format."""
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "examples": len(examples),
            "formats": dict(Counter(e.kind for e in examples))}


def training_card(cfg: TrainConfig, where, datasets, encoding: dict, trainer, result,
                  losses: tuple[float | None, float | None], checkpoint: Path | None, start: float) -> dict:
    """The card of a finished run (`start`: its time.monotonic() at the beginning)."""
    history = trainer.state.log_history
    return {
        "adapter_id": cfg.registered_id,
        "base_model": cfg.model or DEFAULT_MODEL,
        "base_model_path": where.path,
        "quantization": cfg.quantization,
        "compute_dtype": str(where.dtype).removeprefix("torch."),
        "device": str(where.device), "world_size": trainer.args.world_size,
        **datasets.info,
        "encoding": encoding,
        "hyperparameters": cfg.hyperparameters(),
        "initial_eval_loss": losses[0], "final_eval_loss": losses[1],
        "final_train_loss": last_train_loss(history), "mean_train_loss": result.training_loss if result else None,
        "eval_history": eval_history(history),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "wall_time_s": round(time.monotonic() - start, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def _versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    import loramux

    return {"loramux": getattr(loramux, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}
