"""`loramux train ...` and `loramux merge ...` (dispatched here by loramux.cli)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from loramux.trainer.config import COMPUTE_DTYPES, DEFAULT_TARGETS, QUANTIZATIONS, SCHEDULERS, TrainConfig
from loramux.trainer.data import DataError

TRAIN_EPILOG = """\
data: JSONL, one object per line: {"prompt": ..., "completion": ...} (loss on the completion),
{"messages": [{"role": ..., "content": ...}, ...]} (loss on assistant turns), or {"text": ...}.
EOS is appended after each completion. The whole file is checked before training starts.

multi-GPU: run the same command under `torchrun --nproc-per-node N -m loramux train ...` or
`accelerate launch -m loramux train ...`; each process takes its local GPU (data parallel),
and --batch-size is per GPU.

output: --out/adapter_config.json, --out/adapter_model.safetensors, --out/training_card.json;
checkpoints under --out/checkpoints/ (for --resume).
"""


def _train_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data=Path(), out=Path())
    p = argparse.ArgumentParser(prog="loramux train", description="Train a (Q)LoRA adapter with transformers' "
                                "Trainer over PEFT.", epilog=TRAIN_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, help="training JSONL file")
    g.add_argument("--eval-data", type=Path, help="eval JSONL file (eval loss per evaluation)")
    g.add_argument("--eval-split", type=float, default=0.0, help="hold out this fraction of --data for eval")
    g.add_argument("--train-on-all-tokens", action="store_true",
                   help="loss on prompt tokens too (default: completion / assistant tokens only)")
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help=f"truncate longer examples (default: {d.max_seq_len})")
    g = p.add_argument_group("base model")
    g.add_argument("--model", help="base model: smollm2-135m-instruct (default), tiny, bench-30m, a folder or a "
                   "hub id")
    g.add_argument("--quantization", choices=QUANTIZATIONS, default=d.quantization,
                   help="base weights: nf4 (QLoRA, default), fp4, int8, none")
    g.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=d.compute_dtype,
                   help="auto: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--device", default=d.device, help="auto (each process's local GPU, else CPU) | cpu | cuda:N")
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank r (default: {d.rank})")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 * rank)")
    g.add_argument("--dropout", type=float, default=d.dropout, help=f"LoRA dropout (default: {d.dropout})")
    g.add_argument("--target-modules", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME",
                   help="layer names, space- or comma-separated (default: all attention and MLP linears)")
    g.add_argument("--use-rslora", action="store_true", help="rank-stabilised scaling alpha/sqrt(r)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=d.epochs, help=f"(default: {d.epochs:g})")
    g.add_argument("--max-steps", type=int, default=d.max_steps, help="optimizer steps; overrides --epochs")
    g.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr:g})")
    g.add_argument("--lr-scheduler", choices=SCHEDULERS, default=d.lr_scheduler, metavar="NAME",
                   help=f"transformers' schedule: {', '.join(SCHEDULERS)} (default: {d.lr_scheduler})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"per device (default: {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g = p.add_argument_group("run")
    g.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    g.add_argument("--eval-steps", type=int, default=0, help="evaluate every N steps (default 0: every epoch)")
    g.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (default 0: every epoch)")
    g.add_argument("--save-total-limit", type=int, default=d.save_total_limit, help="checkpoints kept")
    g.add_argument("--logging-steps", type=int, default=d.logging_steps)
    g.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --out/checkpoints, or the one given; "
                        "pass the same step options (--epochs/--max-steps/--batch-size/--grad-accum)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    g.add_argument("--register", metavar="ADDRESS", help="register the adapter on a running server when done")
    g.add_argument("--adapter-id", help="id for --register (default: the --out folder name)")
    g.add_argument("--log-level", default="INFO")
    return p


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loramux merge", description="Merge a LoRA adapter into its base model. "
                                "The base is loaded UNQUANTIZED (merging into 4-bit weights would lose the "
                                "adapter); the output is a full model folder with its tokenizer.")
    p.add_argument("--model", help="base model: a named model, folder or hub id (default: the named model in the "
                   "adapter's training_card.json, else smollm2-135m-instruct)")
    p.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder")
    p.add_argument("--out", type=Path, required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the base and the merged weights (default: float32)")
    p.add_argument("--device", default="cpu", help="where to merge (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--log-level", default="INFO")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    targets = tuple(t for arg in args.target_modules for t in arg.split(",") if t)
    return TrainConfig(
        data=args.data, out=args.out, model=args.model, eval_data=args.eval_data, eval_split=args.eval_split,
        train_on_all_tokens=args.train_on_all_tokens, quantization=args.quantization,
        compute_dtype=args.compute_dtype, device=args.device, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, target_modules=targets, use_rslora=args.use_rslora, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, lr_scheduler=args.lr_scheduler, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len, seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
        eval_steps=args.eval_steps, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
        logging_steps=args.logging_steps, resume=args.resume, overwrite=args.overwrite,
        register=args.register, adapter_id=args.adapter_id,
    )


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str]) -> int:
    """argv[0] is "train" or "merge"; returns the exit status (2: bad options or data)."""
    command, rest = argv[0], argv[1:]
    if command == "merge":
        args = _merge_parser().parse_args(rest)
        _setup_logging(args.log_level)
        from loramux.trainer.merge import merge

        try:
            print(merge(args.adapter, args.out, args.model, args.dtype, args.device, args.overwrite))
        except ValueError as exc:
            print(f"loramux merge: {exc}", file=sys.stderr)
            return 2
        return 0
    args = _train_parser().parse_args(rest)
    _setup_logging(args.log_level)
    from loramux.trainer.run import RegistrationError, train

    try:
        card = train(config_from_args(args))
    except (DataError, ValueError) as exc:
        print(f"loramux train: {exc}", file=sys.stderr)
        return 2
    except RegistrationError as exc:
        print(f"loramux train: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {card['steps']} steps in {card['wall_time_s']:.1f} s; "
          f"eval loss {card['initial_eval_loss']} -> {card['final_eval_loss']}; "
          f"final train loss {card['final_train_loss']}")
    return 0
