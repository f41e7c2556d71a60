"""The adapter registry: adapter id -> validated folder on disk.

Registration checks everything that could fail later (files, config, target modules,
shapes, rank), and holds the config to the tensors as PEFT's loading does (`peft_rules`),
so a bad adapter is refused here and never discovered, or served with a guessed scaling,
at request time.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load

from loramux.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied
from loramux.lora import files, peft_rules
from loramux.lora.peft_rules import BaseModules

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,127}$")


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter: what ListAdapters reports and what loading needs."""

    adapter_id: str
    path: Path
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")
    size_bytes: int
    source: str  # "rpc" or "dir"
    scalings: dict[str, float] = field(repr=False, default_factory=dict)  # module -> scaling
    tensor_names: dict[str, dict[str, str]] = field(repr=False, default_factory=dict)
    signature: tuple = field(repr=False, default=())  # (size, mtime_ns) of the weights file


@dataclass
class AdapterWeights:
    """One adapter's tensors in host memory: module -> (A [r, in], B^T [r, out], scaling).
    B is kept transposed, as the slots store it, so loading a slot copies contiguous rows."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    # SHA-256 of the weights file's bytes and the scalings: what the adapter computes, whatever
    # its id. Keys and values made with these weights are cached under it (engine prefix cache).
    identity: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.layers.values())


def _check_finite(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], wpath: Path) -> None:
    """Refuse NaN or infinite weights: one batched max |w| over every tensor (two checks per
    tensor, 420 on SmolLM2's 7 projections, were ~20 ms of a ~50 ms load)."""
    flat = [t for pair in pairs.values() for t in pair if t.numel()]
    if not flat:
        return
    # torch._foreach_max is recent (mid-2024): per tensor on a torch that lacks it.
    most = (torch._foreach_max(torch._foreach_abs(flat)) if hasattr(torch, "_foreach_max")
            else [t.abs().max() for t in flat])
    if torch.isfinite(torch.stack(most)).all():
        return
    bad = next(module for module, pair in pairs.items() if not all(torch.isfinite(t).all() for t in pair))
    raise InvalidArgument(f"{wpath}: {bad} holds NaN or infinite values")


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def check_adapter_id(adapter_id: str) -> None:
    if not ADAPTER_ID.match(adapter_id) or ".." in adapter_id:
        raise InvalidArgument(
            f"adapter id {adapter_id[:64]!r} is invalid: use 1-128 characters from "
            "letters, digits, '.', '_', '-', '/', starting with a letter or digit"
        )


class AdapterStore:
    """Owns the id -> record map; validates against the base model's layer shapes."""

    def __init__(self, layer_shapes: dict[str, tuple[int, int]], roots: tuple[Path, ...],
                 max_rank: int, max_bytes: int, dtype: torch.dtype, base: BaseModules | None = None) -> None:
        self.layer_shapes = layer_shapes  # module name -> (in_features, out_features)
        # The whole base as PEFT's matching sees it; without it, only the served layers.
        self.base = base or BaseModules.from_layers(layer_shapes)
        self.roots = roots
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.dtype = dtype
        self._records: dict[str, AdapterRecord] = {}
        self._lock = threading.Lock()

    def resolve_path(self, path: str) -> Path:
        """Resolve symlinks and `..`, then require the result under an allowed root."""
        if not path or "\x00" in path:
            raise InvalidArgument("path is empty or contains a NUL byte")
        real = Path(os.path.realpath(path))
        for root in self.roots:
            if real == root or root in real.parents:
                return real
        allowed = ", ".join(str(r) for r in self.roots)
        raise PermissionDenied(f"path {path!r} is outside the allowed adapter roots ({allowed})")

    def inspect(self, adapter_id: str, folder: Path, source: str) -> AdapterRecord:
        """Validate an adapter folder without registering it: accept it only where PEFT would
        load it onto this base with no missing, unexpected or mis-sized key."""
        check_adapter_id(adapter_id)
        if not folder.is_dir():
            raise InvalidArgument(f"{folder}: not a folder")
        cpath = folder / files.CONFIG_FILE
        config = peft_rules.parse_config(files.read_config(folder), cpath)
        alpha = peft_rules.check_alpha(config.lora_alpha, "lora_alpha", cpath)
        wpath = files.weights_path(folder)
        header = files.read_safetensors_header(wpath, self.max_bytes)
        modules = files.group_by_module(list(header), wpath)
        for module in modules:
            self._check_module(module, wpath)
        self._check_targets(config, set(modules), cpath)
        scalings, ranks = {}, []
        for module, pair in modules.items():
            a, b = header[pair["A"]][1], header[pair["B"]][1]
            self._check_shapes(module, a, b, wpath)
            rank = peft_rules.module_rank(config, module, a, b, cpath)
            if rank > self.max_rank:
                raise InvalidArgument(f"{wpath}: rank {rank} at {module} exceeds --max-lora-rank {self.max_rank}")
            scalings[module] = peft_rules.module_scaling(config, module, rank, cpath)
            ranks.append(rank)
        stat = wpath.stat()
        return AdapterRecord(
            adapter_id=adapter_id, path=folder, rank=max(ranks), alpha=alpha,
            target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
            size_bytes=stat.st_size + cpath.stat().st_size,
            source=source, scalings=scalings, tensor_names=modules,
            signature=(stat.st_size, stat.st_mtime_ns),
        )

    def _check_module(self, module: str, path: Path) -> None:
        kind = self.base.kinds.get(module)
        if kind is None:
            raise InvalidArgument(
                f"{path}: targets {module}, which the base model does not have (was it trained on another base?)"
            )
        if kind != peft_rules.SERVED:
            raise InvalidArgument(
                f"{path}: LoRA on {module} ({kind}) is {peft_rules.UNSUPPORTED}: only the linear layers "
                "of the decoder blocks are served"
            )

    def _check_targets(self, config: LoraConfig, modules: set[str], path: Path) -> None:
        """Both directions, as PEFT's load reports them: a targeted module without tensors is
        a missing key, tensors of a module the config does not target are unexpected keys."""
        targeted = peft_rules.targeted_modules(config, self.base, path)
        for module in targeted:
            if module not in modules:
                self._check_module(module, path)  # lm_head, embeddings: unsupported, whatever the tensors
        what = f"target_modules={peft_rules.short(config.target_modules)}"
        if extra := sorted(modules - set(targeted)):
            raise InvalidArgument(
                f"{path}: {what} does not select {extra[0]} (with the layers_to_transform, layers_pattern and "
                f"exclude_modules set), but the weights hold tensors for it{_more(extra)}; PEFT finds them unexpected"
            )
        if missing := [m for m in targeted if m not in modules]:
            raise InvalidArgument(
                f"{path}: {what} selects {missing[0]}, but the weights hold no lora_A/lora_B for it"
                f"{_more(missing)}; PEFT finds them missing"
            )

    def _check_shapes(self, module: str, a: list[int], b: list[int], path: Path) -> None:
        fan_in, fan_out = self.layer_shapes[module]
        if len(a) != 2 or len(b) != 2 or a[1] != fan_in or b[0] != fan_out:
            raise InvalidArgument(
                f"{path}: {module} has lora_A {a} and lora_B {b}; the base layer needs "
                f"[r, {fan_in}] and [{fan_out}, r]. Was it trained on another base model?"
            )

    def add(self, record: AdapterRecord) -> AdapterRecord:
        with self._lock:
            if record.adapter_id in self._records:
                raise AlreadyExists(f"adapter {record.adapter_id!r} is already registered; unregister it first")
            self._records[record.adapter_id] = record
        return record

    def remove(self, adapter_id: str) -> AdapterRecord:
        with self._lock:
            record = self._records.pop(adapter_id, None)
        if record is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered")
        return record

    def get(self, adapter_id: str) -> AdapterRecord:
        record = self._records.get(adapter_id)
        if record is None:
            raise NotFound(f"adapter {adapter_id!r} is not registered (ListAdapters shows those that are)")
        return record

    def list(self) -> list[AdapterRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.adapter_id)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self._records

    def load_weights(self, record: AdapterRecord) -> AdapterWeights:
        """Read the tensors of a registered adapter into host memory, re-checking the file."""
        wpath = files.weights_path(record.path)
        stat = wpath.stat()
        if (stat.st_size, stat.st_mtime_ns) != record.signature:
            # Changed on disk since registration: check it again before trusting it.
            fresh = self.inspect(record.adapter_id, record.path, record.source)
            if fresh.tensor_names != record.tensor_names or fresh.scalings != record.scalings:
                raise InvalidArgument(
                    f"adapter {record.adapter_id!r}: files changed since registration; register it again"
                )
        try:
            data = wpath.read_bytes()  # once: hashed and parsed from the same bytes
            tensors = load(data)
        except Exception as exc:  # safetensors raises its own error types
            raise InvalidArgument(f"{wpath}: cannot read tensors ({exc})") from None
        digest = hashlib.sha256(data)
        digest.update(json.dumps(record.scalings, sort_keys=True).encode())
        pairs = {module: (tensors[pair["A"]].to(self.dtype), tensors[pair["B"]].to(self.dtype))
                 for module, pair in record.tensor_names.items()}
        _check_finite(pairs, wpath)
        layers = {module: (a.contiguous(), b.T.contiguous(), record.scalings[module])
                  for module, (a, b) in pairs.items()}
        return AdapterWeights(layers, digest.hexdigest())
