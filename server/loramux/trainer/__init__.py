"""The companion trainer: a JSONL dataset -> a (Q)LoRA adapter folder the server can load.

Also a library::

    from loramux.trainer import TrainConfig, train, merge
    card = train(TrainConfig(data=Path("data/shout.jsonl"), out=Path("adapters/shout"), lr=3e-3))

Serving code never imports this package; it imports serving code only for model loading
helpers and the client used by --register.
"""

from __future__ import annotations

from loramux.trainer.config import TrainConfig
from loramux.trainer.data import DataError, Example, load_jsonl

__all__ = ["DataError", "Example", "TrainConfig", "load_jsonl", "merge", "train"]


def train(cfg: TrainConfig) -> dict:
    """Train an adapter into cfg.out; return its training card (see loramux.trainer.run)."""
    from loramux.trainer.run import train as _train

    return _train(cfg)


def merge(adapter, out, model: str | None = None, dtype: str = "float32", device: str = "cpu",
          overwrite: bool = False):
    """Merge an adapter into its unquantized base (see loramux.trainer.merge)."""
    from loramux.trainer.merge import merge as _merge

    return _merge(adapter, out, model, dtype, device, overwrite)
