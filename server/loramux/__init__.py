"""loramux: serve many LoRA adapters on one 4-bit base model over gRPC."""

__version__ = "0.1.0"
