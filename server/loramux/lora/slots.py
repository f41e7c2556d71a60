"""Adapter tiers above the registry: host cache (RAM, LRU by bytes) and device slots.

Device slots hold the adapters the running batch may use. An adapter with running
requests is *pinned*: it sits in `_pinned`, outside the LRU, so it can never be evicted
under them. Idle resident adapters sit in the LRU; evicting one (the side effect in one
hook, `_SlotLRU.popitem`) frees its slot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch
from cachetools import Cache, LRUCache

from loramux import faults
from loramux.errors import FailedPrecondition, Internal, InvalidArgument, LoramuxError, ResourceExhausted
from loramux.lora.layers import StackedLoraLinear, allocate_slots, copy_into_slots, slot_memory
from loramux.lora.store import AdapterRecord, AdapterStore, AdapterWeights

log = logging.getLogger(__name__)


class _SlotLRU(LRUCache):
    """adapter_id -> slot for idle resident adapters; eviction calls `on_evict`."""

    def __init__(self, maxsize: int, on_evict: Callable[[str, int], None]) -> None:
        super().__init__(maxsize)
        self._on_evict = on_evict

    def popitem(self):
        adapter_id, slot = super().popitem()
        self._on_evict(adapter_id, slot)
        return adapter_id, slot


class SlotsFull(LoramuxError):
    """Every slot is pinned by running requests; the caller waits for a release."""


class AdapterSlots:
    """Owns the host cache, the slot table and the copies into the stacked layers."""

    def __init__(self, store: AdapterStore, layers: dict[str, StackedLoraLinear], num_slots: int,
                 host_cache_bytes: int, metrics) -> None:
        self.store = store
        self.layers = layers
        self.ranks = next(iter(layers.values())).ctx.ranks  # shared with the forward pass
        self.num_slots = num_slots
        self.metrics = metrics
        self.host = LRUCache(maxsize=max(host_cache_bytes, 1), getsizeof=lambda w: w.nbytes)
        self._lru = _SlotLRU(num_slots, self._evicted)
        self._pinned: dict[str, tuple[int, int]] = {}  # adapter_id -> (slot, pin count)
        self._free = list(range(num_slots - 1, -1, -1))
        self._identity: dict[int, str] = {}  # slot -> identity of the weights it holds
        self._lock = threading.RLock()

    # --- queries -----------------------------------------------------------------------
    def resident(self) -> set[str]:
        with self._lock:
            return set(self._lru) | set(self._pinned)

    def identity(self, slot: int) -> str:
        """The identity (`AdapterWeights.identity`) of the weights in a pinned slot: a file
        replaced in place and loaded again has another one, though its adapter id is the same."""
        return self._identity[slot]

    def resident_identity(self, adapter_id: str) -> str | None:
        """The identity of an adapter's weights if they are in a slot now, else None."""
        with self._lock:
            if adapter_id in self._pinned:
                return self._identity.get(self._pinned[adapter_id][0])
            # Cache.__getitem__ reads without LRUCache's touch: a peek must not change eviction order.
            return self._identity.get(Cache.__getitem__(self._lru, adapter_id)) if adapter_id in self._lru else None

    def can_acquire(self, adapter_id: str) -> bool:
        """True if `acquire` would succeed without waiting for a release."""
        with self._lock:
            return adapter_id in self._pinned or adapter_id in self._lru or bool(self._free) or bool(self._lru)

    def prefetch(self, adapter_id: str) -> None:
        """Read an adapter's tensors from disk into the host cache, off the engine thread,
        so that admitting its request later costs only the copy into a slot."""
        with self._lock:
            if adapter_id in self.host or adapter_id in self._pinned or adapter_id in self._lru:
                return
            record = self.store.get(adapter_id)
        try:
            weights = self.store.load_weights(record)  # the slow part, outside the lock
        except LoramuxError:
            return  # acquire() will hit the same error and report it to the request
        with self._lock:
            if weights.nbytes <= self.host.maxsize and adapter_id not in self.host:
                self.host[adapter_id] = weights

    # --- pin / unpin -------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> int:
        """Pin `adapter_id` into a slot, loading it if needed; return the slot."""
        with self._lock:
            if adapter_id in self._pinned:
                slot, count = self._pinned[adapter_id]
                self._pinned[adapter_id] = (slot, count + 1)
                self.metrics.adapter_cache_hits.inc()
                return slot
            if adapter_id in self._lru:
                slot = self._lru.pop(adapter_id)
                self._pinned[adapter_id] = (slot, 1)
                self.metrics.adapter_cache_hits.inc()
                return slot
            record = self.store.get(adapter_id)
            slot = self._take_slot()
            self.metrics.adapter_cache_misses.inc()
            try:
                self._load_with_retry(record, slot)
            except InvalidArgument as exc:
                self._free.append(slot)
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} is registered but cannot be loaded: {exc}. Repair its files "
                    "(the next request reloads them) or register it again"
                ) from None
            except BaseException:
                self._free.append(slot)
                raise
            self._pinned[adapter_id] = (slot, 1)
            self._update_gauges()
            return slot

    def release(self, adapter_id: str) -> None:
        """Unpin once; at zero the adapter becomes evictable (or is dropped if unregistered)."""
        with self._lock:
            slot, count = self._pinned[adapter_id]
            if count > 1:
                self._pinned[adapter_id] = (slot, count - 1)
                return
            del self._pinned[adapter_id]
            try:
                self.store.get(adapter_id)
            except LoramuxError:  # unregistered while running: free the slot now
                self._clear(slot)
            else:
                self._lru[adapter_id] = slot
            self._update_gauges()

    def forget(self, adapter_id: str) -> None:
        """Drop an unregistered adapter from host cache and (if idle) its slot."""
        with self._lock:
            self.host.pop(adapter_id, None)
            if adapter_id in self._lru:
                self._clear(self._lru.pop(adapter_id))
            self._update_gauges()

    # --- internals ---------------------------------------------------------------------
    def _take_slot(self) -> int:
        if not self._free:
            if not self._lru:
                raise SlotsFull("all adapter slots are in use by running requests")
            self._lru.popitem()  # evicts the least recently used idle adapter
        # The lowest free slot: the grouped LoRA way computes the span of the slots in use,
        # so few adapters stay cheap after others came and went.
        slot = min(self._free)
        self._free.remove(slot)
        return slot

    def _evicted(self, adapter_id: str, slot: int) -> None:
        # `_take_slot` evicts to load another adapter into this slot at once, and that load
        # writes every row it uses and clears the rest: zeroing the slot first was a second
        # pass over 210 layers (~3 ms of the acquire). Until then the slot is free, and no
        # row reads a free slot (the grouped way may compute it, and drops what it gives).
        self.metrics.adapter_evictions.inc()
        self._forget_slot(slot)
        self._free.append(slot)

    def _clear(self, slot: int) -> None:
        self._wipe(slot)
        self._free.append(slot)

    def _wipe(self, slot: int) -> None:
        copy_into_slots([c for layer in self.layers.values() for c in layer.stage_slot(slot, None, None, 0.0)])
        self._forget_slot(slot)

    def _forget_slot(self, slot: int) -> None:
        """The slot holds no adapter: no rank for the plans, no identity for the prefix cache."""
        self.ranks[slot] = 0
        self._identity.pop(slot, None)

    def _host_weights(self, record: AdapterRecord) -> AdapterWeights:
        weights = self.host.get(record.adapter_id)
        if weights is None:
            weights = self.store.load_weights(record)
            if weights.nbytes <= self.host.maxsize:
                self.host[record.adapter_id] = weights
        return weights

    def _load_with_retry(self, record: AdapterRecord, slot: int) -> None:
        """Out of memory while loading: drop the host cache, free allocator blocks, retry once."""
        try:
            self._load(record, slot)
            return
        except torch.OutOfMemoryError:
            log.warning("out of memory loading adapter %r; evicting the host cache and retrying",
                        record.adapter_id)
        self.host.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            self._load(record, slot)
        except torch.OutOfMemoryError:
            raise ResourceExhausted(
                f"out of memory loading adapter {record.adapter_id!r}, even after evicting cached adapters"
            ) from None

    def _load(self, record: AdapterRecord, slot: int) -> None:
        start = time.perf_counter()
        if faults.load_should_oom(record.adapter_id):
            raise torch.OutOfMemoryError("injected out-of-memory")
        weights = self._host_weights(record)
        try:
            allocate_slots([layer for name, layer in self.layers.items() if name in weights.layers])
            copy_into_slots([c for name, layer in self.layers.items()
                             for c in layer.stage_slot(slot, *weights.layers.get(name, (None, None, 0.0)))])
            self.ranks[slot] = record.rank
            self._identity[slot] = weights.identity
        except torch.OutOfMemoryError:
            self._wipe(slot)
            raise
        except Exception as exc:
            self._wipe(slot)
            raise Internal(f"loading adapter {record.adapter_id!r} into a slot failed: {exc}") from exc
        self.metrics.adapter_load_seconds.observe(time.perf_counter() - start)

    def _update_gauges(self) -> None:
        self.metrics.adapters_active.set(len(self._lru) + len(self._pinned))
        self.metrics.adapter_host_cache_bytes.set(self.host.currsize)
        self.metrics.lora_slot_memory.set(slot_memory(self.layers)[0])  # grows as layers are targeted
