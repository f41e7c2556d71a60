"""The base model with stacked LoRA slots, run one prefill or decode step at a time.

Rows of different lengths share one left-padded KV cache: a 2-D attention mask hides the
padding and explicit position ids keep each row's positions its own, so a row's output
does not depend on the rows beside it. Rows join (`merge`) and leave (`select`) between
steps: continuous batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loramux.lora.layers import attach_stacked_lora


class GrowingLayer(DynamicLayer):
    """One layer's keys and values in a buffer with room to spare.

    transformers' DynamicLayer concatenates the whole cache at every decode step (half of
    a step's time at batch 24 on the benchmark model); this one writes the new position in
    place and grows the buffer by half when full. `keys`/`values` are views of the filled
    part, which is all attention reads.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Stack groups of rows ([b_i, heads, L_i, head_dim] each), left-padding the shorter
        with zeros, straight into one buffer: a single copy however the batch was made."""
        super().__init__()
        self.length = max(k.shape[-2] for k in keys)
        self._k, self._v = _stack(keys, self.length), _stack(values, self.length)
        self.device, self.is_initialized = keys[0].device, True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[-2]:
            self._k, self._v = _stack([self.keys], self.length), _stack([self.values], self.length)
        self._k[:, :, self.length : self.length + n].copy_(key_states)
        self._v[:, :, self.length : self.length + n].copy_(value_states)
        self.length += n
        self._expose()
        return self.keys, self.values


def _stack(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """Rows of `parts` right-aligned to `length` in a new buffer with room to grow by half.
    Padding is zeroed: attention gives it weight 0, and 0 x garbage could be NaN."""
    _, heads, _, dim = parts[0].shape
    buf = parts[0].new_empty(sum(p.shape[0] for p in parts), heads, length + max(32, length // 2), dim)
    row = 0
    for p in parts:
        rows, pad = p.shape[0], length - p.shape[-2]
        if pad:
            buf[row : row + rows, :, :pad].zero_()
        buf[row : row + rows, :, pad:length].copy_(p)
        row += rows
    return buf


def _cache(groups: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> DynamicCache:
    """A cache whose layer i stacks layer i of every group (each a per-layer kv list)."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer([k for k, _ in layer], [v for _, v in layer]) for layer in zip(*groups, strict=True)]
    return cache


@dataclass
class Batch:
    """KV state of rows decoded together; index i of every field is row i."""

    cache: DynamicCache  # GrowingLayers: per layer keys and values [B, kv_heads, L, head_dim]
    mask: torch.Tensor  # [B, L] long: 1 for a real token, 0 for left padding
    next_pos: list[int]  # position id of each row's next token
    slots: list[int]  # LoRA slot per row, -1 for the bare base

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]


class Runner:
    """Owns the model (base + LoRA slots) and the tensors of one step; no scheduling."""

    def __init__(self, model, tokenizer, num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.ctx, self.layers = attach_stacked_lora(model, num_slots, max_rank, dtype, device)
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (layer.in_features, layer.out_features) for n, layer in self.layers.items()}

    @property
    def slot_bytes(self) -> int:
        return sum(b.nbytes for layer in self.layers.values() for b in layer.buffers(recurse=False))

    def model_bytes(self) -> int:
        return self.model.get_memory_footprint() - self.slot_bytes

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, Batch]:
        """Run whole prompts; return last-position logits [n, vocab] and their batch."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, slots)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return logits, Batch(_cache([kv]), mask, [len(p) for p in prompts], list(slots))

    @torch.inference_mode()
    def decode(self, batch: Batch, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row, extend the batch's cache; return logits [B, vocab]."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        batch.mask = F.pad(batch.mask, (0, 1), value=1)
        positions = torch.tensor(batch.next_pos, dtype=torch.long, device=self.device).view(-1, 1)
        logits = self._forward(ids, batch.mask, positions, batch.cache, batch.slots)
        batch.next_pos = [p + 1 for p in batch.next_pos]
        return logits

    def _forward(self, ids, mask, positions, cache, slots) -> torch.Tensor:
        self.ctx.set(slots, self.device)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.ctx.set([], self.device)
        return out.logits[:, -1, :]


def merge(a: Batch | None, b: Batch) -> Batch:
    """Rows of `a` then rows of `b`, left-padding the shorter cache."""
    if a is None:
        return b
    width = max(a.mask.shape[1], b.mask.shape[1])
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for m in (a.mask, b.mask)])
    return Batch(_cache([a.kv, b.kv]), mask, a.next_pos + b.next_pos, a.slots + b.slots)


def select(batch: Batch, keep: list[int]) -> Batch | None:
    """Keep only rows `keep` (in that order) and drop columns that are padding for all."""
    if not keep:
        return None
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    mask = batch.mask.index_select(0, idx)
    start = int((mask.sum(0) > 0).nonzero()[0, 0]) if mask.any() else 0
    kv = [(k.index_select(0, idx)[:, :, start:], v.index_select(0, idx)[:, :, start:]) for k, v in batch.kv]
    return Batch(_cache([kv]), mask[:, start:], [batch.next_pos[i] for i in keep], [batch.slots[i] for i in keep])


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = ids if isinstance(ids, list) else [ids]
    ids = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
