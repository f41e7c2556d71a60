"""The options of one training run, checked once before anything heavy happens."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Every linear layer of a Llama-style decoder block: attention and MLP.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "warmup_stable_decay")


@dataclass(frozen=True)
class TrainConfig:
    """Everything `loramux train` takes; the hyperparameters land in the training card."""

    data: Path
    out: Path
    model: str | None = None  # None: the embedded default model
    eval_data: Path | None = None
    eval_split: float = 0.0
    train_on_all_tokens: bool = False
    # base
    quantization: str = "nf4"
    compute_dtype: str = "auto"  # float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    # LoRA
    rank: int = 16
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    use_rslora: bool = False
    # optimisation
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    lr: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024
    seed: int = 42
    gradient_checkpointing: bool = False
    # bookkeeping
    eval_steps: int = 0  # 0: evaluate once per epoch
    save_steps: int = 0  # 0: a checkpoint once per epoch
    save_total_limit: int = 2
    logging_steps: int = 10
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False
    register: str | None = None  # address of a running server
    adapter_id: str | None = None

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def registered_id(self) -> str:
        return self.adapter_id or self.out.resolve().name

    def validate(self) -> None:
        """Raise ValueError naming the option that is wrong."""
        checks = [
            (self.quantization in QUANTIZATIONS, f"--quantization must be one of {', '.join(QUANTIZATIONS)}"),
            (self.compute_dtype in COMPUTE_DTYPES, f"--compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}"),
            (self.lr_scheduler in SCHEDULERS, f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}"),
            (self.rank >= 1, "--rank must be at least 1"),
            (self.alpha is None or self.alpha > 0, "--alpha must be positive"),
            (0.0 <= self.dropout < 1.0, "--dropout must be in [0, 1)"),
            (bool(self.target_modules), "--target-modules needs at least one module name"),
            (self.epochs > 0 or self.max_steps > 0, "--epochs or --max-steps must be positive"),
            (self.lr > 0, "--lr must be positive"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "--batch-size and --grad-accum must be at least 1"),
            (self.max_seq_len >= 2, "--max-seq-len must be at least 2"),
            (self.eval_steps >= 0 and self.save_steps >= 0, "--eval-steps and --save-steps must be >= 0"),
            (self.logging_steps >= 1, "--logging-steps must be at least 1"),
            (self.save_total_limit >= 1, "--save-total-limit must be at least 1"),
            (0.0 <= self.eval_split < 1.0, "--eval-split must be in [0, 1)"),
            (not (self.eval_data and self.eval_split), "give --eval-data or --eval-split, not both"),
            (not (self.resume and self.overwrite), "--resume and --overwrite contradict each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def hyperparameters(self) -> dict:
        """The options as JSON-ready values (paths as strings)."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        out["target_modules"] = list(self.target_modules)
        out["lora_alpha"] = self.lora_alpha
        return out
