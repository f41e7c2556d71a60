"""The --out folder: what a new run may replace, what --resume continues, how the adapter is written.

Layout when done (only PEFT files at the top, so that an adapter folder scanned by
`loramux serve --adapter-dir` registers cleanly, and the checkpoints one level down where
the folder watcher does not look)::

    out/adapter_config.json
    out/adapter_model.safetensors
    out/training_card.json
    out/checkpoints/loramux-run.json     (the first run's options, checked on --resume)
    out/checkpoints/checkpoint-N/...     (Trainer checkpoints)
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from loramux.trainer.card import CARD_FILE, RUN_FILE, read_json
from loramux.trainer.config import TrainConfig

log = logging.getLogger(__name__)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Options that decide the total number of steps: a resumed run must repeat them.
STEP_OPTIONS = ("epochs", "max_steps", "batch_size", "grad_accum")


def prepare_out(cfg: TrainConfig, main: bool = True) -> Path | None:
    """Check --out against --resume/--overwrite; return the checkpoint to resume from, if any.

    Only the main process (`main`) deletes a run that --overwrite replaces.
    """
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.resume:
        if cfg.resume != "latest":
            path = Path(cfg.resume)
            if not (path / "trainer_state.json").is_file():
                raise ValueError(f"--resume {path}: not a Trainer checkpoint (no trainer_state.json)")
            return path
        last = get_last_checkpoint(str(cfg.checkpoint_dir)) if cfg.checkpoint_dir.is_dir() else None
        if last is None:
            raise ValueError(f"--resume: no checkpoint-N folder in {cfg.checkpoint_dir}")
        return Path(last)
    ours = [cfg.out / n for n in (*PEFT_FILES, CARD_FILE, "checkpoints")]
    present = [p for p in ours if p.exists()]
    if present and not cfg.overwrite:
        raise ValueError(f"{cfg.out} already holds a run ({', '.join(p.name for p in present)}); "
                         "pass --resume to continue it or --overwrite to start over")
    if main:
        for p in present:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    cfg.out.mkdir(parents=True, exist_ok=True)
    return None


def check_resume(cfg: TrainConfig, checkpoint: Path, data_sha: str) -> None:
    """Warn where the resumed run differs from the one that wrote the checkpoint."""
    first = read_json(checkpoint.parent / RUN_FILE)
    if first is None:
        log.warning("%s: no %s next to it; cannot check the options match", checkpoint, RUN_FILE)
        return
    before = first.get("hyperparameters", {})
    changed = [k for k in STEP_OPTIONS if k in before and before[k] != getattr(cfg, k)]
    if changed:
        log.warning("resuming with different %s than the interrupted run (%s): the total number of "
                    "steps changes", ", ".join(changed), ", ".join(f"{k}={before[k]}" for k in changed))
    if first.get("data_sha256") not in (None, data_sha):
        log.warning("resuming on a different --data file than the interrupted run")


def save_adapter(model, out: Path) -> None:
    """PEFT's safetensors files, weights first and config last, each renamed into place whole."""
    tmp = out / ".saving"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    mode = 0o666 & ~_umask()  # readable by a server running as another user, as umask allows
    for name in reversed(PEFT_FILES):
        os.chmod(tmp / name, mode)
        os.replace(tmp / name, out / name)
    shutil.rmtree(tmp, ignore_errors=True)  # PEFT's README.md stays out of the adapter folder


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
