"""One training run: data checked, base loaded, transformers' Trainer over PEFT, adapter saved.

The order matters: every line of the data is validated and tokenized, and --out checked,
before the model loads, so that a bad input fails in seconds and writes nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from loramux.trainer.card import CARD_FILE, RUN_FILE, eval_history, file_info, training_card, write_json
from loramux.trainer.config import TrainConfig
from loramux.trainer.data import Example, load_jsonl, split_eval
from loramux.trainer.output import check_resume, prepare_out, save_adapter

log = logging.getLogger(__name__)


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
    info = {"data": file_info(cfg.data, train)}
    evals: list[Example] = []
    if cfg.eval_data:
        evals = load_jsonl(cfg.eval_data)
        info["eval_data"] = file_info(cfg.eval_data, evals)
    elif cfg.eval_split:
        train, evals = split_eval(train, cfg.eval_split, cfg.seed)
        info["eval_data"] = {"split": cfg.eval_split, "examples": len(evals)}
    return Datasets(train, evals, info)


def _checkpointing_args(cfg: TrainConfig, fields: set[str]) -> dict:
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing (the old
    # names still work there, with a warning); 4.x knows only the old ones.
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: cfg.gradient_checkpointing, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(cfg: TrainConfig, where, has_eval: bool):
    from dataclasses import fields

    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        **_checkpointing_args(cfg, {f.name for f in fields(TrainingArguments)}),
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


def restore_finished(trainer, model, checkpoint: Path) -> bool:
    """Load `checkpoint` and return True when it already reached this run's total steps.

    transformers' Trainer, resumed from such a checkpoint, still takes one more step; a run
    that died after its last checkpoint but before writing the adapter only needs the weights.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    total = trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1]
    if state.global_step < total:
        return False
    set_peft_model_state_dict(model, load_file(checkpoint / "adapter_model.safetensors"))
    trainer.state = state
    log.info("%s already completed all %d steps: writing its adapter", checkpoint, total)
    return True


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
    if checkpoint and restore_finished(trainer, model, checkpoint):
        result = None
    else:
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
