"""`training_card.json`: what an adapter was trained from and how, written next to its weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CARD_FILE = "training_card.json"
RUN_FILE = "loramux-run.json"  # in --out/checkpoints: what a resumed run needs from the first one


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
