"""Server configuration: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

QUANTIZATIONS = ("nf4", "fp4", "int8", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
CPU_4BIT_KERNELS = ("fused", "dequantize")
CPU_LORA_KERNELS = ("fused", "torch")
CPU_ATTENTION_KERNELS = ("fused", "sdpa")
MIXED_STEPS = ("on", "off")
HOST_MEMORY = ("keep", "release")


@dataclass(frozen=True)
class ServerConfig:
    """Everything `loramux serve` can be told; see `cli.py` for the flags."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9090  # 0: any free port; -1: no metrics endpoint
    http_port: int = 0  # OpenAI-compatible HTTP beside gRPC; 0: off
    model: str | None = None  # None: the embedded default model, built locally
    quantization: str = "nf4"
    compute_dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    cpu_4bit_kernel: str = "fused"  # fused: loramux's kernel for few rows; dequantize: bitsandbytes' way only
    cpu_lora_kernel: str = "fused"  # fused: loramux's kernel for decode steps' LoRA term; torch: tensor ops only
    cpu_attention_kernel: str = "fused"  # fused: loramux's kernel for decode steps' attention; sdpa: torch's only
    adapter_dir: Path = Path("adapters")
    allow_adapter_roots: tuple[Path, ...] = ()
    max_active_adapters: int = 32  # device slots
    max_lora_rank: int = 16  # slot tensors are sized by it
    host_cache_bytes: int = 2 << 30
    prefix_cache_bytes: int | None = None  # None: 1/16 of the device's memory; 0: no prefix cache
    max_adapter_bytes: int = 1 << 30
    max_batch_size: int = 16
    host_memory: str = "keep"  # keep: freed host memory is reused, not returned (memory.py)
    torch_threads: int = 0  # of the engine thread; 0: torch's default (every usable core on CPU)
    max_queue: int = 256
    max_prefill_tokens: int = 512  # one prefill's rows x longest prompt (one long prompt always fits)
    mixed_steps: str = "on"  # on: prompts admitted while rows decode are computed in the decode step's forward
    max_slot_wait: float = 0.02  # seconds an adapter waits for a slot before a running one is parked for it
    min_slot_turn: float = 1.5  # seconds a running adapter keeps its slot before it can be parked
    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    adapter_scan_interval: float = 2.0  # seconds; 0 turns the folder watcher off
    drain_timeout: float = 30.0
    admin_token: str | None = None  # required (as a bearer token) by AdapterRegistry writes
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_bytes: int = 4 << 20  # gRPC receive/send limit
    log_requests: bool = False  # one JSON line per request on the loramux.requests logger
    ready_file: Path | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.quantization in QUANTIZATIONS, f"--quantization must be one of {QUANTIZATIONS}"),
            (self.compute_dtype in DTYPES, f"--compute-dtype must be one of {DTYPES}"),
            (self.cpu_4bit_kernel in CPU_4BIT_KERNELS, f"--cpu-4bit-kernel must be one of {CPU_4BIT_KERNELS}"),
            (self.cpu_lora_kernel in CPU_LORA_KERNELS, f"--cpu-lora-kernel must be one of {CPU_LORA_KERNELS}"),
            (self.mixed_steps in MIXED_STEPS, f"--mixed-steps must be one of {MIXED_STEPS}"),
            (self.host_memory in HOST_MEMORY, f"--host-memory must be one of {HOST_MEMORY}"),
            (self.cpu_attention_kernel in CPU_ATTENTION_KERNELS,
             f"--cpu-attention-kernel must be one of {CPU_ATTENTION_KERNELS}"),
            (self.max_active_adapters >= 1, "--max-active-adapters must be at least 1"),
            (1 <= self.max_lora_rank <= 1024, "--max-lora-rank must be in [1, 1024]"),
            (self.max_batch_size >= 1, "--max-batch-size must be at least 1"),
            (self.torch_threads >= 0, "--torch-threads must be >= 0"),
            (self.max_queue >= 1, "--max-queue must be at least 1"),
            (self.max_slot_wait >= 0, "--max-slot-wait must be >= 0"),
            (self.min_slot_turn >= 0, "--min-slot-turn must be >= 0"),
            (self.max_prefill_tokens >= 1, "--max-prefill-tokens must be at least 1"),
            (self.max_new_tokens_limit >= 1, "--max-new-tokens-limit must be at least 1"),
            (
                1 <= self.default_max_new_tokens <= self.max_new_tokens_limit,
                "--default-max-new-tokens must be in [1, --max-new-tokens-limit]",
            ),
            (self.host_cache_bytes >= 0, "--host-cache-bytes must be >= 0"),
            (self.prefix_cache_bytes is None or self.prefix_cache_bytes >= 0, "--prefix-cache-bytes must be >= 0"),
            (self.max_adapter_bytes >= 1, "--max-adapter-bytes must be positive"),
            (self.adapter_scan_interval >= 0, "--adapter-scan-interval must be >= 0"),
            (0 <= self.port <= 65535, "--port must be in [0, 65535]"),
            (-1 <= self.metrics_port <= 65535, "--metrics-port must be in [-1, 65535]"),
            (0 <= self.http_port <= 65535, "--http-port must be in [0, 65535] (0: off)"),
            ((self.tls_cert is None) == (self.tls_key is None), "--tls-cert and --tls-key go together"),
            (self.max_message_bytes >= 1024, "--max-message-bytes must be at least 1024"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def adapter_roots(self) -> tuple[Path, ...]:
        """Folders under which RegisterAdapter may read, symlinks resolved."""
        return tuple(p.resolve() for p in (self.adapter_dir, *self.allow_adapter_roots))
