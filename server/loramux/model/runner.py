"""The base model with stacked LoRA slots, run one prefill or decode step at a time.

Rows of different lengths share one left-padded KV cache: a 2-D attention mask hides the
padding and explicit position ids keep each row's positions its own, so a row's output
does not depend on the rows beside it. Rows join (`merge`) and leave (`Batch.remove`)
between steps: continuous batching. Rows can also step out with their keys and values
(`Batch.take`) and join again later, e.g. while their adapter waits for a slot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from loramux.lora.layers import attach_stacked_lora, slot_memory
from loramux.memory import huge_empty
from loramux.model import kernels, mixed
from loramux.model.attention import NAME as ATTENTION
from loramux.model.attention import teams, use_decode_kernel
from loramux.model.calibrate import dense_head_rows, forward_cost_tokens, fused_4bit_rows, lora_costs
from loramux.model.head import DenseHead
from loramux.model.norm import lean_norms
from loramux.model.prefix import BLOCK
from loramux.model.quant import lean_4bit

log = logging.getLogger(__name__)

LEFT_ROOM = 64  # free columns kept left of the live window, for joining prompts wider than it
RIGHT_ROOM = 64  # at least this many free columns kept right of it, for decode steps
RIGHT_SHARE = 0.5  # new buffers' room right of the window, as a share of its width (and LEFT_ROOM)


class RowLayer(DynamicLayer):
    """One layer's keys and values in buffers [rows, kv_heads, columns, head_dim] with room
    to spare. Its Batch says which rows and columns are live; a step writes its new
    columns in place (transformers' DynamicLayer re-concatenates the whole cache at every
    step: half of a decode step's time on the benchmark model)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.buf_k, self.buf_v = keys, values
        self.device, self.is_initialized = keys.device, True
        self.expose(0, 0, 0)

    def expose(self, n: int, lo: int, hi: int) -> None:
        self.n, self.lo, self.hi = n, lo, hi
        self.keys = self.buf_k[:n, :, lo:hi]
        self.values = self.buf_v[:n, :, lo:hi]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        t = key_states.shape[-2]
        self.buf_k[: self.n, :, self.hi : self.hi + t].copy_(key_states)
        self.buf_v[: self.n, :, self.hi : self.hi + t].copy_(value_states)
        self.expose(self.n, self.lo, self.hi + t)
        return self.keys, self.values


@dataclass
class Group:
    """Rows just prefilled together, not yet in the running batch."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [k, kv_heads, width, head_dim]
    mask: torch.Tensor  # [k, width] long: 1 for a real token, 0 for left padding
    next_pos: list[int]  # position id of each row's next token
    slots: list[int]  # LoRA slot per row, -1 for the bare base
    # Per row, the prefix cache blocks its first keys and values are a copy of (their ids;
    # empty if none): rows with the same blocks share those numbers exactly (`Batch.teams`).
    origins: list[tuple[int, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.origins = self.origins or [()] * len(self.slots)

    @torch.inference_mode()
    def select(self, keep: list[int]) -> Group:
        """Only rows `keep` (e.g. without those that ended at their first token)."""
        idx = torch.tensor(keep, device=self.mask.device)
        return Group([(k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.kv],
                     self.mask.index_select(0, idx), [self.next_pos[i] for i in keep],
                     [self.slots[i] for i in keep], [self.origins[i] for i in keep])


class Batch:
    """Owns the KV state of the rows decoded together; index i of every list is row i.

    Live rows are 0..size-1 and live columns lo..hi-1 of buffers with room to spare, so
    each change copies only what changes: a decode step writes one column, a leaving row
    is replaced by the last live row, a joining group is copied into free rows. Padding
    and stale columns are hidden by the mask (attention gives them weight 0; buffers start
    zeroed so that stale values are always finite: 0 x NaN would still be NaN).
    Whatever changes it runs in inference mode: its buffers may be made during a step, and
    torch refuses in-place changes to such tensors outside that mode.
    """

    @torch.inference_mode()
    def __init__(self, group: Group, rows: int = 0) -> None:
        """A batch of `group`'s rows, with buffers for `rows` rows (more if the group has
        more): rows that join later fill them without copying the whole cache."""
        self.n, self.lo, self.hi = 0, 0, 0
        self.next_pos: list[int] = []
        self.slots: list[int] = []
        self.origins: list[tuple[int, ...]] = []
        self._teams: tuple[torch.Tensor, torch.Tensor] | bool | None = None  # None: not worked out
        k0 = group.kv[0][0]
        self._shape = (k0.shape[1], k0.shape[3])  # kv_heads, head_dim
        self._dtype, self._device = k0.dtype, k0.device
        self.mask = torch.zeros(rows, 0, dtype=torch.long, device=self._device)
        self.cache = DynamicCache()
        self.cache.layers = [RowLayer(*self._empty(rows, 0)) for _ in group.kv]
        self.append(group)

    @property
    def size(self) -> int:
        return self.n

    def _empty(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers left unwritten: a column is exposed only once written by a step or a join,
        or zeroed by `append` as padding. Zero-filling them at each relayout wrote the whole
        buffers (~0.9 GB for 32 rows of ~350 tokens on SmolLM2: 40 ms, ~350 ms in fresh pages)
        for the few rows a young batch holds."""
        heads, dim = self._shape
        shape = (rows, heads, cols, dim)
        return huge_empty(shape, self._dtype, self._device), huge_empty(shape, self._dtype, self._device)

    def _relayout(self, rows: int, left: int) -> None:
        """Move the live window to `left` free columns from the buffers' start, with room
        after it: the only whole-cache copy, once in many steps. Within the buffers it has
        where they hold `rows` rows and the room; else into new ones, with room after the
        window for half of it and the left room (`RIGHT_SHARE`). New buffers are fresh memory,
        which this VM's host backs on first touch, 2-28 us a page (bench/README.md, stop 38):
        a 32-row batch of ~380 columns on SmolLM2 took 3.8 s to move into new buffers in the
        server; the same copy into buffers already touched takes ~33 ms."""
        n, lo, hi, w = self.n, self.lo, self.hi, self.hi - self.lo
        room = max(RIGHT_ROOM, 1)  # a decode step's column at least
        if rows <= self.mask.shape[0] and left + w + room <= self.mask.shape[1]:
            self._slide(left)
            return
        cols = left + w + max(room, int(RIGHT_SHARE * (left + w)))
        log.debug("batch buffers: new, %d rows x %d columns for %d rows x %d live", rows, cols, n, w)
        mask = torch.zeros(rows, cols, dtype=torch.long, device=self._device)
        mask[:n, left : left + w] = self.mask[:n, lo:hi]
        self.mask = mask
        for layer in self.cache.layers:
            k, v = self._empty(rows, cols)
            k[:n, :, left : left + w] = layer.buf_k[:n, :, lo:hi]
            v[:n, :, left : left + w] = layer.buf_v[:n, :, lo:hi]
            layer.buf_k, layer.buf_v = k, v
        self.lo, self.hi = left, left + w

    def _slide(self, left: int) -> None:
        """Move the live window within the buffers to start at column `left`. Source and
        target may overlap, so in runs of `shift` columns, first the run nearest the target:
        each run's target holds only columns already moved. Its callers move the window by
        at least LEFT_ROOM or RIGHT_ROOM columns (64), so a ~380-column window is ~6 runs."""
        n, lo, hi = self.n, self.lo, self.hi
        shift = lo - left
        runs = list(range(lo, hi, abs(shift))) if shift else []
        for start in runs if shift > 0 else reversed(runs):
            end = min(start + abs(shift), hi)
            src, dst = slice(start, end), slice(start - shift, end - shift)
            self.mask[:n, dst] = self.mask[:n, src]
            for layer in self.cache.layers:
                layer.buf_k[:n, :, dst] = layer.buf_k[:n, :, src]
                layer.buf_v[:n, :, dst] = layer.buf_v[:n, :, src]
        self.lo, self.hi = left, left + hi - lo

    def _expose(self) -> None:
        for layer in self.cache.layers:
            layer.expose(self.n, self.lo, self.hi)

    @torch.inference_mode()
    def append(self, group: Group, rows: int = 0) -> None:
        """Copy a prefilled group into free rows, right-aligned to the live columns; if the
        buffers are short of rows, they grow to at least `rows` (the rows about to join)."""
        k, width = group.mask.shape
        want, rows = rows, self.mask.shape[0]
        if self.n + k > rows or self.hi - width < 0:  # rows grow geometrically, only when short
            rows = rows if self.n + k <= rows else max(self.n + k, 2 * rows, 8, want)
            self._relayout(rows, max(width - (self.hi - self.lo), 0) + LEFT_ROOM)
        start, new = self.hi - width, slice(self.n, self.n + k)
        # Padding this join exposes unwritten, as (rows, columns): the old rows' columns when
        # the window widens left, else the new rows' columns left of their tokens.
        pad = (slice(0, self.n), slice(start, self.lo)) if start < self.lo else (new, slice(self.lo, start))
        self.lo = min(self.lo, start)
        self.mask[pad] = 0
        self.mask[new, start : self.hi] = group.mask
        zero = pad[0].stop > pad[0].start and pad[1].stop > pad[1].start
        for layer, (gk, gv) in zip(self.cache.layers, group.kv, strict=True):
            for buf, g in ((layer.buf_k, gk), (layer.buf_v, gv)):
                buf[new, :, start : self.hi] = g
                if zero:  # masked, but finite: attention that reads every column (SDPA) takes 0 x NaN to NaN
                    buf[pad[0], :, pad[1]] = 0
        self.n += k
        self.next_pos += group.next_pos
        self.slots += group.slots
        self.origins += group.origins
        self._teams = None
        self._expose()

    @torch.inference_mode()
    def remove(self, drop: set[int]) -> list[int]:
        """Drop rows `drop`; the last live rows move into their places. Returns, for each
        row still live, its index before (the caller reorders its own rows the same way)."""
        n = self.n - len(drop)
        holes = [i for i in sorted(drop) if i < n]
        movers = [i for i in range(n, self.n) if i not in drop]
        order, cols = list(range(n)), slice(self.lo, self.hi)
        # Row by row: a few rows leave a step, and a slice's copy takes half the time of
        # indexing's gather and scatter (SmolLM2, ~370 columns: 1.5 against 3.7 ms a row).
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
            self.mask[hole, cols] = self.mask[mover, cols]
            for layer in self.cache.layers:
                layer.buf_k[hole, :, cols] = layer.buf_k[mover, :, cols]
                layer.buf_v[hole, :, cols] = layer.buf_v[mover, :, cols]
        self.n = n
        self.next_pos = [self.next_pos[i] for i in order]
        self.slots = [self.slots[i] for i in order]
        self.origins = [self.origins[i] for i in order]
        self._teams = None
        if n:  # columns that are padding for every remaining row leave the window
            self.lo += int(self.mask[:n, self.lo : self.hi].any(0).nonzero()[0, 0])
        else:  # an empty window: rows that join next start it afresh
            self.lo = self.hi
        self._expose()
        return order

    @torch.inference_mode()
    def take(self, rows: set[int]) -> tuple[Group, list[int]]:
        """Take rows out with their state, as a group that can join again (`append`), and
        the order of the rows left, as `remove` returns it. Every row's live columns end
        at the window's right edge, so the group is just as wide as its longest row: rows
        that sat out come back no wider than their own tokens (keys carry their positions)."""
        taken = sorted(rows)
        idx = torch.tensor(taken, device=self._device)
        mask = self.mask[idx, self.lo : self.hi]
        width = int(mask.sum(1).max())
        cols = slice(self.hi - width, self.hi)
        kv = [(layer.buf_k[idx, :, cols], layer.buf_v[idx, :, cols]) for layer in self.cache.layers]
        group = Group(kv, mask[:, mask.shape[1] - width :], [self.next_pos[i] for i in taken],
                      [self.slots[i] for i in taken], [self.origins[i] for i in taken])
        return group, self.remove(rows)

    def teams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rows whose prefixes are copies of the same cached blocks, for decode attention: (lead,
        shared) int32 [rows], row b's first shared[b] positions the same keys and values as row
        lead[b]'s (the team's first row); None if no two rows share. On the prefix workload
        ~4 rows of an adapter share its ~300-token prompt, and each read its own copy every
        step (bench/README.md, stop 35)."""
        if self._teams is None:  # worked out again only when rows join or leave
            first: dict[tuple[int, ...], int] = {}
            lead = [first.setdefault(o, b) if o else b for b, o in enumerate(self.origins)]
            shared = [len(self.origins[b]) * BLOCK for b in lead]
            together = len(first) < sum(1 for o in self.origins if o)
            self._teams = (torch.tensor(lead, dtype=torch.int32),
                           torch.tensor(shared, dtype=torch.int32)) if together else False
        return self._teams or None

    @torch.inference_mode()
    def step_mask(self) -> torch.Tensor:
        """Open one more column for a decode step; the mask the model sees for it."""
        if self.hi >= self.mask.shape[1]:
            self._relayout(self.mask.shape[0], LEFT_ROOM)
        self.mask[: self.n, self.hi] = 1
        self._expose()
        return self.mask[: self.n, self.lo : self.hi + 1]

    @torch.inference_mode()
    def stepped(self) -> None:
        """After a decode step: the new column is live."""
        self.hi += 1
        self.next_pos = [p + 1 for p in self.next_pos]
        self._expose()


class Runner:
    """Owns the model (base + LoRA slots) and the tensors of one step; no scheduling."""

    def __init__(self, model, tokenizer, num_slots: int, max_rank: int,
                 device: torch.device, dtype: torch.dtype, fused_4bit: bool = True,
                 fused_lora: bool = True, fused_attention: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.lean = lean_4bit(model, fused_4bit)  # before wrapping: the LoRA layers call the base layers' forward
        if device.type == "cpu" and dtype == torch.float32:
            lean_norms(model)
        # Decode steps' LoRA term in one kernel call per layer where it runs.
        cpu_kernels = device.type == "cpu" and dtype == torch.float32 and kernels.load()
        kernel = kernels.isa() if fused_lora and cpu_kernels else None
        self.ctx, self.layers = attach_stacked_lora(model, num_slots, max_rank, dtype, device, kernel)
        if kernel:  # the 4-bit product and the LoRA term in one call, where the base has the kernel
            for layer in self.layers.values():
                layer.with_lora = self.lean.with_lora.get(layer.base)
        head = model.get_output_embeddings()
        if head is not None:
            # transformers hands the head each row's last position, a strided [rows, 1, hidden]
            # view when prompts have several tokens: matmul's strided path took 2.5x as long
            # as a contiguous input (~50 of a ~450 ms prefill of 8 prompts on SmolLM2).
            head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        self.head = DenseHead(head)  # oneDNN for the head's product where `calibrate` finds it faster
        # Decode steps' and riders' attention in one kernel call per layer (batched prompts keep SDPA).
        self.attention_kernel = bool(fused_attention and cpu_kernels and use_decode_kernel(model, kernels.isa()))
        # What one more prefill forward costs, in prompt tokens (`calibrate` measures it):
        # on a CPU a forward's fixed cost is dequantizing every layer and Python; on an
        # accelerator padding costs little and every forward is a train of launches.
        self.forward_cost_tokens = 16.0
        self._num_slots, self._max_rank, self._dtype = num_slots, max_rank, dtype
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = _eos_ids(model, tokenizer)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 2048))

    def calibrate(self) -> None:
        """Measure the cost-model constants on this model and device (about a second)."""
        started = time.perf_counter()
        fused_4bit_rows(self.lean)  # first: the forward costs below depend on it
        dense_head_rows(self.head)
        costs = lora_costs([(layer.in_features, layer.out_features) for layer in self.layers.values()],
                           self._num_slots, self._max_rank, self._dtype, self.device)
        c = self.ctx.costs
        c.direct, c.group, c.row_rank = costs.direct, costs.group, costs.row_rank
        self.forward_cost_tokens = forward_cost_tokens(
            lambda prompts: self.prefill(prompts, [-1] * len(prompts)), self.pad_id or 0, self.device)
        log.info("cost model measured in %.1fs: a prefill forward costs %.0f prompt tokens; per LoRA layer "
                 "%.0f us per direct adapter, grouped %.0f us + %.2f ns per row x rank",
                 time.perf_counter() - started, self.forward_cost_tokens, c.direct * 1e6, c.group * 1e6,
                 c.row_rank * 1e9)

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:
        return {n: (layer.in_features, layer.out_features) for n, layer in self.layers.items()}

    @property
    def slot_bytes(self) -> int:
        """Bytes of LoRA slot tensors allocated so far (layers get them on first use)."""
        return slot_memory(self.layers)[0]

    def model_bytes(self) -> int:
        return self.model.get_memory_footprint() - self.slot_bytes

    def prefill_parts(self, lengths: list[int]) -> list[list[int]]:
        """Split prompts of these lengths into prefills (`prefill` pads each to its longest)."""
        return split_by_length(lengths, self.forward_cost_tokens)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int], pasts: list[torch.Tensor | None] | None = None,
                origins: list[tuple[int, ...]] | None = None) -> tuple[torch.Tensor, Group]:
        """Run whole prompts; return last-position logits [n, vocab] and their rows' state.
        `pasts[i]`, if given, holds the keys and values of prompt i's first tokens ([layers,
        2, kv_heads, h, head_dim], from the prefix cache): only the rest is computed;
        `origins[i]`, the ids of the cache blocks they start with (`Group.origins`)."""
        hits = [0 if p is None else p.shape[3] for p in pasts or [None] * len(prompts)]
        new = max(len(p) - h for p, h in zip(prompts, hits, strict=True))  # columns computed
        # Each row's prompt ends at the right edge: rows whose rest is shorter than `new` take
        # some cached tokens again (as padding would cost), rows shorter than it take none.
        used = [max(len(p) - new, 0) for p in prompts]
        past = max(used)
        mask = torch.zeros((len(prompts), past + new), dtype=torch.long)
        ids = torch.full((len(prompts), new), self.pad_id, dtype=torch.long)
        for i, (p, q) in enumerate(zip(prompts, used, strict=True)):
            ids[i, new - (len(p) - q):] = torch.tensor(p[q:])
            mask[i, past + new - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        cache = self._seeded(pasts, used, past, new) if past else DynamicCache()
        logits = self._forward(ids, mask, positions, cache, slots)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        # A row that computes some of its cached tokens again keeps the copies before them only.
        kept = [o[:q // BLOCK] for o, q in zip(origins or [()] * len(prompts), used, strict=True)]
        return logits, Group(kv, mask, [len(p) for p in prompts], list(slots), kept)

    def _seeded(self, pasts: list[torch.Tensor | None], used: list[int], width: int, new: int) -> DynamicCache:
        """A cache holding each row's first `used[i]` cached tokens right-aligned to `width`
        columns, with room for `new` more written in place by the forward (`RowLayer`):
        DynamicLayer would copy the whole cache again to append them."""
        first = next(p for p in pasts if p is not None)
        layers, _, heads, _, dim = first.shape
        kv = torch.empty(layers, 2, len(pasts), heads, width + new, dim, dtype=first.dtype, device=first.device)
        for i, (p, q) in enumerate(zip(pasts, used, strict=True)):
            kv[:, :, i, :, :width - q] = 0  # padding: masked, but it must be finite (0 x NaN is NaN)
            if q:
                kv[:, :, i, :, width - q:width] = p[:, :, :, :q]
        cache = DynamicCache()
        cache.layers = [RowLayer(kv[layer, 0], kv[layer, 1]) for layer in range(layers)]
        for layer in cache.layers:
            layer.expose(len(pasts), 0, width)
        return cache

    @staticmethod
    def row_kv(group: Group, row: int, length: int) -> Callable[[int, int], torch.Tensor]:
        """Keys and values of row `row`'s tokens start..end (of its `length` live ones) as
        [layers, 2, kv_heads, end - start, head_dim]: what the prefix cache stores."""
        def kv(start: int, end: int) -> torch.Tensor:
            left = group.mask.shape[1] - length
            cols = slice(left + start, left + end)
            # One stack of every layer's views: stacking each layer's pair first copied it twice.
            return torch.stack([t[row, :, cols] for pair in group.kv for t in pair]).unflatten(0, (-1, 2))
        return kv

    def group_from_past(self, past: torch.Tensor, slot: int, origin: tuple[int, ...] = ()) -> Group:
        """A one-row group holding cached keys and values only (`prefill_more` goes on from it)."""
        n = past.shape[3]
        kv = [(past[layer, 0].unsqueeze(0), past[layer, 1].unsqueeze(0)) for layer in range(past.shape[0])]
        return Group(kv, torch.ones((1, n), dtype=torch.long, device=self.device), [n], [slot], [origin])

    @torch.inference_mode()
    def prefill_more(self, group: Group, chunk: list[int]) -> tuple[torch.Tensor, Group]:
        """Go on prefilling one row's prompt: `chunk` after the tokens `group` already holds
        (a long prompt in pieces, so that decode steps run between them)."""
        if len(group.next_pos) != 1:
            raise ValueError("prefill_more continues one row")
        cache = DynamicCache()
        for i, (k, v) in enumerate(group.kv):
            cache.update(k, v, i)
        new = torch.ones((1, len(chunk)), dtype=torch.long, device=self.device)
        mask = torch.cat([group.mask, new], dim=1)
        start = group.next_pos[0]
        positions = torch.arange(start, start + len(chunk), device=self.device).view(1, -1)
        ids = torch.tensor([chunk], dtype=torch.long, device=self.device)
        logits = self._forward(ids, mask, positions, cache, group.slots)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        return logits, Group(kv, mask, [start + len(chunk)], list(group.slots), list(group.origins))

    @torch.inference_mode()
    def decode(self, batch: Batch, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row, extend the batch's cache; return logits [B, vocab]."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        mask = batch.step_mask()
        positions = torch.tensor(batch.next_pos, dtype=torch.long, device=self.device).view(-1, 1)
        with teams(batch.teams() if self.attention_kernel else None):
            logits = self._forward(ids, mask, positions, batch.cache, batch.slots)
        batch.stepped()
        return logits

    @property
    def mixes(self) -> bool:
        """Whether `decode_mixed` runs here: it needs loramux's attention function."""
        return self.model.config._attn_implementation == ATTENTION

    @torch.inference_mode()
    def decode_mixed(self, batch: Batch, tokens: list[int], prompts: list[list[int]], slots: list[int],
                     pasts: list[torch.Tensor | None], origins: list[tuple[int, ...]] | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, list[Group]]:
        """A decode step (`decode`) that also prefills `prompts` (after the cached `pasts` and
        their `origins`, as `prefill`) in the same forward (`mixed`): the rows' logits [B,
        vocab], the prompts' last-position logits [k, vocab] and a one-row group per prompt,
        to join the batch."""
        n = batch.size
        mask = batch.step_mask().bool()
        ids, pos, token_slots = list(tokens), list(batch.next_pos), list(batch.slots)
        riders, keep = [], list(range(n))  # riders: (keys and values of every layer, cached, start, causal)
        layer0 = batch.cache.layers[0].buf_k
        for p, slot, past in zip(prompts, slots, pasts, strict=True):
            hit = 0 if past is None else past.shape[3]
            kv = torch.empty(len(batch.cache.layers), 2, 1, layer0.shape[1], len(p), layer0.shape[3],
                             dtype=layer0.dtype, device=layer0.device)
            if hit:
                kv[:, :, 0, :, :hit] = past
            riders.append((kv, hit, len(ids), mixed.causal(hit, len(p), self.device)))
            ids += p[hit:]
            pos += range(hit, len(p))
            token_slots += [slot] * (len(p) - hit)
            keep.append(len(ids) - 1)
        cache = DynamicCache()
        cache.layers = [mixed.MixedLayer(layer, mask, [mixed.Rider(kv[i, 0], kv[i, 1], hit, start, causal)
                                                       for kv, hit, start, causal in riders])
                        for i, layer in enumerate(batch.cache.layers)]
        self.ctx.set(token_slots, self.device, per_token=True)
        try:
            with teams(batch.teams() if self.attention_kernel else None):
                out = self.model(input_ids=torch.tensor([ids], device=self.device),
                                 attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device),
                                 position_ids=torch.tensor([pos], device=self.device), past_key_values=cache,
                                 use_cache=True, logits_to_keep=torch.tensor(keep, device=self.device))
        finally:
            self.ctx.set([], self.device)
            mixed.done()
        batch.stepped()
        logits = out.logits[0]
        groups = [Group([(kv[i, 0], kv[i, 1]) for i in range(kv.shape[0])],
                        torch.ones((1, len(p)), dtype=torch.long, device=self.device), [len(p)], [slot], [origin])
                  for (kv, *_), p, slot, origin in zip(riders, prompts, slots, origins or [()] * len(prompts),
                                                       strict=True)]
        return logits[:n], logits[n:], groups

    @torch.inference_mode()
    def score(self, past: torch.Tensor, last_logits: torch.Tensor, slot: int,
              candidates: list[list[int]]) -> list[float]:
        """Log-probability of each candidate's tokens after a prompt whose keys and values are
        `past` ([layers, 2, kv_heads, n, head_dim]) and whose last position gave `last_logits`
        [vocab]: one forward over the candidates but their last tokens, right-padded (causal
        attention keeps the padding out of every real position)."""
        first = torch.log_softmax(last_logits.float(), -1)
        scores = [float(first[c[0]]) for c in candidates]
        width = max(len(c) for c in candidates) - 1
        if width == 0:
            return scores
        n, k = past.shape[3], len(candidates)
        ids = torch.full((k, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((k, n + width), dtype=torch.long)
        mask[:, :n] = 1
        for i, c in enumerate(candidates):
            ids[i, :len(c) - 1] = torch.tensor(c[:-1])
            mask[i, n:n + len(c) - 1] = 1
        positions = torch.arange(n, n + width, device=self.device).expand(k, -1)
        cache = self._seeded([past] * k, [n] * k, n, width)
        logp = torch.log_softmax(self._forward(ids.to(self.device), mask.to(self.device), positions, cache,
                                               [slot] * k, keep=0).float(), -1)  # [k, width, vocab]
        for i, c in enumerate(candidates):
            scores[i] += float(sum(logp[i, j, t] for j, t in enumerate(c[1:])))
        return scores

    def _forward(self, ids, mask, positions, cache, slots, keep: int = 1) -> torch.Tensor:
        """Last-position logits [rows, vocab]; with keep=0, every position's [rows, width, vocab]."""
        self.ctx.set(slots, self.device)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=keep)
        finally:
            self.ctx.set([], self.device)
        return out.logits if keep == 0 else out.logits[:, -1, :]


def split_by_length(lengths: list[int], forward_cost: int) -> list[list[int]]:
    """Indices of `lengths` in groups, shortest first, that minimise the padded tokens
    (rows x longest per group) plus `forward_cost` per group: prompts of 32 and 128 tokens
    padded together compute 96 tokens of nothing (14% of all prefill tokens in
    bench.vs_peft). Groups hold neighbours in length order, so a small DP is exact."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    best = [0] * (len(order) + 1)  # best[j]: cost of the first j prompts in length order
    cut = [0] * (len(order) + 1)  # where best[j]'s last group starts
    for j in range(1, len(order) + 1):
        best[j], cut[j] = min((best[i] + (j - i) * lengths[order[j - 1]] + forward_cost, i) for i in range(j))
    groups, j = [], len(order)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def merge(batch: Batch | None, group: Group, rows: int = 0) -> Batch:
    """The running batch with `group`'s rows after its own (a new batch if none runs); buffers
    made or grown now hold at least `rows` rows."""
    if batch is None:
        return Batch(group, rows)
    batch.append(group, rows)
    return batch


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config else None
    ids = ids if isinstance(ids, list) else [ids]
    ids = {i for i in ids if i is not None}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
