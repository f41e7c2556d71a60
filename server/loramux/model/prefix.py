"""Keys and values of prompt prefixes, reused by later prompts that start the same way.

Every layer's keys and values depend on the adapter (LoRA on any projection of layer i
changes the input of layer i+1), so entries live in a *namespace*: the identity of the
weights that made them (`AdapterWeights.identity`, a hash of the file's bytes and the
scalings; "base" for the bare base), never the adapter id. An id registered again with
other files, or a folder replaced in place, has another namespace and cannot hit.

The cache holds blocks of `BLOCK` tokens. Block j of a prompt is keyed by (the id of block
j-1, or of the namespace for j = 0; its tokens): a chain that matches a prompt only where
every earlier token matched too (vLLM's block hashes, but keyed by ids and token tuples, so
a hash collision can never serve another prefix). After the last whole block that matches,
a lookup also serves the longest start of the next block that a cached child of that
block shares (keys and values of a block's first tokens depend on those tokens only): a
question after a system prompt that ends mid-block recomputes none of the prompt (on
bench.prefix ~7 of a request's ~40 computed tokens at BLOCK 16). Blocks are LRU by bytes. A prefill copies
a hit into the row's own batch, so evicting a block never touches a running row; every
lookup touches a chain leaf first, so a parent is always more recent than its children and
eviction takes leaves first (no unreachable block outlives its parent). Blocks live in
slabs asked for huge pages, and an evicted block's memory is the next block's (`_Pool`).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cachetools import Cache, LRUCache

from loramux.memory import huge_empty

BLOCK = 16  # tokens per block: only whole blocks are stored; a lookup may serve a block's start
BASE = "base"  # the namespace of the bare base model's rows

_ids = itertools.count(1)


def default_bytes(device: torch.device) -> int:
    """1/16 of the device's memory (RAM on CPU): room for tens of thousands of tokens on
    small models, while the batch's own keys and values and the slots keep the rest."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // 16


@dataclass(frozen=True)
class _Block:
    id: int
    namespace: str
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, BLOCK, head_dim]


class _BlockLRU(LRUCache):
    """(parent id, tokens) -> block, bounded by bytes; eviction calls `on_evict(key, block)`."""

    def __init__(self, maxsize: int, on_evict: Callable[[tuple, _Block], None]) -> None:
        super().__init__(maxsize, getsizeof=lambda b: b.kv.nbytes)
        self._on_evict = on_evict

    def popitem(self):
        item = super().popitem()
        self._on_evict(*item)
        return item


class _Pool:
    """Owns the memory of the blocks: slabs of up to SLAB_BYTES, asked for huge pages, and
    the blocks that eviction freed. A block of fresh 4 KiB pages cost 180 page faults on
    SmolLM2 (737 KB), 2-28 us each on this project's VM: a workload of prompts that never
    hit spent up to a tenth of its time there. Slabs are made as the cache fills, never
    more blocks than the bound holds and the one being inserted; they stay until the cache
    goes (its peak, as a server that preallocates its KV cache holds)."""

    SLAB_BYTES = 64 << 20

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._free: list[torch.Tensor] = []
        self._made = 0

    def take(self, like: torch.Tensor) -> torch.Tensor:
        """Memory for a block shaped like `like` (same dtype and device), unwritten."""
        if not self._free:
            room = self._max_bytes // like.nbytes + 1 - self._made
            count = max(1, min(self.SLAB_BYTES // like.nbytes, room))
            slab = huge_empty((count, *like.shape), like.dtype, like.device)
            self._free.extend(reversed(slab.unbind(0)))  # popped from the slab's start
            self._made += count
        return self._free.pop()

    def give(self, kv: torch.Tensor) -> None:
        self._free.append(kv)


class PrefixCache:
    """Owns the cached blocks, their namespaces and which adapter ids made each namespace."""

    def __init__(self, max_bytes: int, metrics) -> None:
        self.metrics = metrics
        self._blocks = _BlockLRU(max_bytes, self._evicted)
        self._pool = _Pool(max_bytes)
        self._children: defaultdict[int, set[tuple]] = defaultdict(set)  # parent id -> its blocks' keys
        self._roots: dict[str, int] = {}  # namespace -> id its first blocks are keyed under
        self._owners: defaultdict[str, set[str]] = defaultdict(set)  # adapter id -> its namespaces
        self._lock = threading.Lock()  # lookups run on the engine thread, drops on others

    @property
    def nbytes(self) -> int:
        return int(self._blocks.currsize)

    def lookup(self, namespace: str, tokens: list[int]) -> torch.Tensor | None:
        """Keys and values of the longest cached prefix of `tokens` ([layers, 2, kv_heads,
        n, head_dim]), or None. The last token is never served: its logits are needed, so
        at least one token is always prefilled."""
        return self.lookup_blocks(namespace, tokens)[0]

    def lookup_blocks(self, namespace: str, tokens: list[int]) -> tuple[torch.Tensor | None, tuple[int, ...]]:
        """`lookup`, and the ids of the whole blocks the keys and values start with: rows
        whose prefixes came from the same blocks hold the same numbers there (a block never
        changes; a block made again gets a new id), which decode attention reads once for
        all of them (`Batch.teams`)."""
        with self._lock:
            chain = self._chain(namespace, tokens, (len(tokens) - 1) // BLOCK)
            part, n = self._part(tokens, chain)
            if part is not None:
                self._touch([part, *chain])  # the part's block first: its parent stays more recent
        parts = [block.kv for _, block in chain] + ([part[1].kv[:, :, :, :n]] if n else [])
        self.metrics.prefix_cache_query_tokens.inc(len(tokens))
        if not parts:
            return None, ()
        self.metrics.prefix_cache_hit_tokens.inc(len(chain) * BLOCK + n)
        return torch.cat(parts, dim=3), tuple(block.id for _, block in chain)

    def peek(self, namespace: str, tokens: list[int]) -> int:
        """How many tokens `lookup` would serve now (no block touched, nothing counted)."""
        with self._lock:
            chain = self._walk(namespace, tokens, (len(tokens) - 1) // BLOCK)
            return len(chain) * BLOCK + self._part(tokens, chain)[1]

    def insert(self, namespace: str, owner: str, tokens: list[int], kv: Callable[[int, int], torch.Tensor]) -> None:
        """Cache the full blocks of `tokens`; `kv(start, end)` gives those tokens' keys and
        values ([layers, 2, kv_heads, end - start, head_dim]), asked once, for the blocks the
        cache lacks."""
        full = len(tokens) // BLOCK
        # Blocks are written in place: in inference mode always, as their slabs were made.
        with self._lock, torch.inference_mode():
            chain = self._chain(namespace, tokens, full)
            if len(chain) < full:
                self._owners[owner].add(namespace)
                self._add(namespace, tokens, chain, kv(len(chain) * BLOCK, full * BLOCK))
        self.metrics.prefix_cache_bytes.set(self.nbytes)

    def forget(self, adapter_id: str) -> None:
        """Drop the blocks an unregistered adapter made (its namespaces start afresh)."""
        with self._lock:
            namespaces = self._owners.pop(adapter_id, set())
            for namespace in namespaces:
                self._roots.pop(namespace, None)
            for key in [k for k, b in self._blocks.items() if b.namespace in namespaces]:
                self._pool.give(self._blocks.pop(key).kv)
                self._children.pop(key[0], None)  # its siblings share its namespace: dropped too
        self.metrics.prefix_cache_bytes.set(self.nbytes)

    def _part(self, tokens: list[int], chain: list) -> tuple[tuple | None, int]:
        """The cached child of `chain`'s last block (key, block) sharing the longest start with
        the tokens after `chain`, and that length (at most up to the prompt's last token).
        Only after a whole block: alone, a part would turn a miss into a prefill after a few
        cached tokens (a chat template's first tokens are every prompt's)."""
        if not chain:
            return None, 0
        parent, start = chain[-1][1].id, len(chain) * BLOCK
        want = tokens[start:min(start + BLOCK, len(tokens) - 1)]
        best, n = None, 0
        for key in self._children.get(parent, ()) if want else ():
            shared = _shared(key[1], want)
            if shared > n:
                best, n = (key, Cache.__getitem__(self._blocks, key)), shared
        return best, n

    def _evicted(self, key: tuple, block: _Block) -> None:
        self._pool.give(block.kv)  # no reader left: a lookup copies blocks out before the next insert
        self._children[key[0]].discard(key)
        if not self._children[key[0]]:
            del self._children[key[0]]
        self.metrics.prefix_cache_evictions.inc()

    def _add(self, namespace: str, tokens: list[int], chain: list, fresh: torch.Tensor) -> None:
        """Append blocks to `chain` (a cached prefix of `tokens`) from `fresh`, the keys and
        values of the tokens after it, up to the last full block."""
        start = len(chain)
        parent = chain[-1][1].id if chain else self._roots.setdefault(namespace, next(_ids))
        for j in range(start, len(tokens) // BLOCK):
            # A copy: a view would keep the whole prompt's tensor alive after eviction.
            part = fresh[:, :, :, (j - start) * BLOCK:(j - start + 1) * BLOCK]
            kv = self._pool.take(part).copy_(part)
            key, block = (parent, tuple(tokens[j * BLOCK:(j + 1) * BLOCK])), _Block(next(_ids), namespace, kv)
            try:
                self._blocks[key] = block
            except ValueError:  # a block larger than the whole cache
                self._pool.give(kv)
                break
            self._children[parent].add(key)
            chain.append((key, block))
            parent = block.id
        self._touch(chain)

    def _chain(self, namespace: str, tokens: list[int], limit: int) -> list[tuple[tuple, _Block]]:
        """`_walk`, touched, the first block last (a parent stays more recent than its children)."""
        chain = self._walk(namespace, tokens, limit)
        self._touch(chain)
        return chain

    def _walk(self, namespace: str, tokens: list[int], limit: int) -> list[tuple[tuple, _Block]]:
        """(key, block) of the cached blocks of `tokens` from the first, at most `limit`, read
        without LRUCache's touch (Cache.__getitem__): a walk alone never changes eviction order."""
        parent, chain = self._roots.get(namespace), []
        while parent is not None and len(chain) < limit:
            j = len(chain)
            key = (parent, tuple(tokens[j * BLOCK:(j + 1) * BLOCK]))
            if key not in self._blocks:
                break
            block = Cache.__getitem__(self._blocks, key)
            chain.append((key, block))
            parent = block.id
        return chain

    def _touch(self, chain: list[tuple[tuple, _Block]]) -> None:
        for key, _ in reversed(chain):
            if key in self._blocks:  # a block just added may have pushed an older one out
                self._blocks[key]  # noqa: B018 - reading a key makes it the most recent


def _shared(a: tuple[int, ...], b: list[int]) -> int:
    """Length of the common start of `a` and `b`."""
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
