"""One training run: data checked, base loaded, transformers' Trainer over PEFT, adapter saved.

Layout of --out when done (only PEFT files at the top, so that an adapter folder scanned by
`loramux serve --adapter-dir` registers cleanly)::

    out/adapter_config.json
    out/adapter_model.safetensors
    out/training_card.json
    out/checkpoints/checkpoint-N/...   (Trainer checkpoints, for --resume)
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from loramux.trainer.card import CARD_FILE, RUN_FILE, eval_history, last_train_loss, read_json, sha256_file, write_json
from loramux.trainer.config import TrainConfig
from loramux.trainer.data import Example, load_jsonl, split_eval

log = logging.getLogger(__name__)
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Options that decide the total number of steps: a resumed run must repeat them.
STEP_OPTIONS = ("epochs", "max_steps", "batch_size", "grad_accum")


class RegistrationError(RuntimeError):
    """--register failed; the adapter itself was saved."""


@dataclass(frozen=True)
class Datasets:
    """Validated examples and where they came from, before tokenization."""

    train: list[Example]
    eval: list[Example]
    info: dict  # for the training card


def read_datasets(cfg: TrainConfig) -> Datasets:
    """Validate every line of the training (and eval) file; raise DataError before any model loads."""
    train = load_jsonl(cfg.data)
    info = {"data": _file_info(cfg.data, train)}
    evals: list[Example] = []
    if cfg.eval_data:
        evals = load_jsonl(cfg.eval_data)
        info["eval_data"] = _file_info(cfg.eval_data, evals)
    elif cfg.eval_split:
        train, evals = split_eval(train, cfg.eval_split, cfg.seed)
        info["eval_data"] = {"split": cfg.eval_split, "examples": len(evals)}
    return Datasets(train, evals, info)


def _file_info(path: Path, examples: list[Example]) -> dict:
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "examples": len(examples),
            "formats": dict(Counter(e.kind for e in examples))}


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


def training_arguments(cfg: TrainConfig, where, has_eval: bool):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed, data_seed=cfg.seed,
        bf16=str(where.dtype) == "torch.bfloat16", fp16=str(where.dtype) == "torch.float16",
        use_cpu=where.device.type == "cpu",
        eval_strategy=("steps" if cfg.eval_steps else "epoch") if has_eval else "no",
        eval_steps=cfg.eval_steps or None,
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps, report_to="none",
        prediction_loss_only=True, remove_unused_columns=False, label_names=["labels"],
        dataloader_pin_memory=where.device.type == "cuda", ddp_find_unused_parameters=False,
    )


def _final_log_callback():
    from transformers import TrainerCallback

    class LogLastStep(TrainerCallback):
        """Log the training loss at the last step too, so the card's final train loss is final."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogLastStep()


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


def register(cfg: TrainConfig) -> None:
    """Register --out on a running server; replace an adapter of the same id."""
    import grpc

    from loramux.client import Client

    with Client(cfg.register) as client:
        try:
            client.register(cfg.registered_id, str(cfg.out.resolve()))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise RegistrationError(f"--register {cfg.register}: {exc.code().name}: {exc.details()}") from None
            client.unregister(cfg.registered_id)
            client.register(cfg.registered_id, str(cfg.out.resolve()))
    log.info("registered adapter %r on %s", cfg.registered_id, cfg.register)


def _versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    import loramux

    return {"loramux": getattr(loramux, "__version__", None), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__}


def encode_datasets(cfg: TrainConfig, datasets: Datasets, tokenizer) -> tuple[list[dict], list[dict], dict]:
    """Token ids and labels of the train and eval examples, and the train encoding stats."""
    from loramux.trainer.encode import encode_all

    train_rows, stats = encode_all(datasets.train, tokenizer, cfg.max_seq_len, cfg.train_on_all_tokens, str(cfg.data))
    eval_rows = []
    if datasets.eval:
        eval_rows, _ = encode_all(datasets.eval, tokenizer, cfg.max_seq_len, cfg.train_on_all_tokens,
                                  str(cfg.eval_data or cfg.data))
    if stats.truncated or stats.dropped:
        log.warning("%d examples truncated to --max-seq-len %d; %d dropped with no trained token left",
                    stats.truncated, cfg.max_seq_len, stats.dropped)
    return train_rows, eval_rows, asdict(stats)


def build_trainer(cfg: TrainConfig, where, model, tokenizer, train_rows: list[dict], eval_rows: list[dict]):
    from transformers import Trainer

    from loramux.trainer.encode import PadCollator

    return Trainer(model=model, args=training_arguments(cfg, where, bool(eval_rows)),
                   train_dataset=train_rows, eval_dataset=eval_rows or None,
                   data_collator=PadCollator(tokenizer.pad_token_id), callbacks=[_final_log_callback()])


def initial_eval_loss(trainer, model) -> float:
    with model.disable_adapter():  # the base alone: what a fresh LoRA (B = 0) starts from
        loss = trainer.evaluate()["eval_loss"]
    log.info("initial eval loss %.4f", loss)
    return loss


def final_eval_loss(trainer) -> float:
    """The last evaluation's loss if it ran at the last step; else evaluate now."""
    evals = eval_history(trainer.state.log_history)
    done = evals and evals[-1]["step"] == trainer.state.global_step
    loss = evals[-1]["eval_loss"] if done else trainer.evaluate()["eval_loss"]
    log.info("final eval loss %.4f", loss)
    return loss


def training_card(cfg: TrainConfig, where, datasets: Datasets, encoding: dict, trainer, result,
                  losses: tuple[float | None, float | None], checkpoint: Path | None, start: float) -> dict:
    history = trainer.state.log_history
    return {
        "adapter_id": cfg.registered_id,
        "base_model": cfg.model or "embedded default model (tiny)",
        "base_model_path": where.path,
        "quantization": cfg.quantization,
        "compute_dtype": str(where.dtype).removeprefix("torch."),
        "device": str(where.device), "world_size": trainer.args.world_size,
        **datasets.info,
        "encoding": encoding,
        "hyperparameters": cfg.hyperparameters(),
        "initial_eval_loss": losses[0], "final_eval_loss": losses[1],
        "final_train_loss": last_train_loss(history), "mean_train_loss": result.training_loss,
        "eval_history": eval_history(history),
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch,
        "resumed_from": str(checkpoint) if checkpoint else None,
        "wall_time_s": round(time.monotonic() - start, 2),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def train(cfg: TrainConfig) -> dict:
    """Train an adapter into cfg.out and return its training card.

    Raises DataError (bad data) or ValueError (bad options) before any model is loaded.
    """
    start = time.monotonic()
    cfg.validate()
    datasets = read_datasets(cfg)  # before any heavy import: bad data fails in a second

    from accelerate import PartialState
    from transformers import set_seed

    from loramux.trainer.model import load_for_training, load_tokenizer, placement

    where = placement(cfg)
    tokenizer = load_tokenizer(where.path)
    train_rows, eval_rows, encoding = encode_datasets(cfg, datasets, tokenizer)
    state = PartialState()
    main = state.is_main_process
    checkpoint = prepare_out(cfg, main)
    state.wait_for_everyone()  # other ranks must not race the main one deleting an --overwrite'd run
    if checkpoint:
        check_resume(cfg, checkpoint, datasets.info["data"]["sha256"])
    elif main:
        cfg.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_json(cfg.checkpoint_dir / RUN_FILE, {"hyperparameters": cfg.hyperparameters(),
                                                   "data_sha256": datasets.info["data"]["sha256"]})
    set_seed(cfg.seed)  # the LoRA initialisation too
    model = load_for_training(cfg, where)
    trainer = build_trainer(cfg, where, model, tokenizer, train_rows, eval_rows)
    initial = initial_eval_loss(trainer, model) if eval_rows else None
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    final = final_eval_loss(trainer) if eval_rows else None
    trainer.accelerator.wait_for_everyone()
    card = training_card(cfg, where, datasets, encoding, trainer, result, (initial, final), checkpoint, start)
    if main:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), cfg.out)
        write_json(cfg.out / CARD_FILE, card)
        log.info("adapter saved to %s (%d steps, %.1f s)", cfg.out, card["steps"], card["wall_time_s"])
        if cfg.register:
            register(cfg)
    return card
