"""The process's host-memory policy: whether memory freed by one step is kept for the next.

Every forward makes and frees tensors of a few MB (activations, logits, a prompt's keys and
values copied out of the prefix cache). glibc's malloc returns such blocks to the kernel
when they are freed (mmap'd blocks are unmapped, the heap's top is trimmed), so the next
step's tensors of the same size start on fresh pages and pay a page fault per 4 KiB: on
this project's 2-core VM 1.7-28 us a fault depending on the hour, ~330,000 faults in a
33 s served run of bench.prefix. CPU inference servers preload tcmalloc or jemalloc for
this (vLLM's CPU backend, Intel's guides); glibc does the same when told to keep freed
memory: `mallopt` raises the size served by mmap to its maximum (32 MiB, blocks below it
come from the heap and are reused) and the trim threshold past any heap, so the process
keeps its peak heap (as a server that preallocates its caches does) and faults stop after
the first steps.

Buffers that live long and are written once, the batch's keys and values and the prefix
cache's blocks, are asked for huge pages (`huge_empty`): one fault per 2 MiB instead of 512.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

import torch

log = logging.getLogger("loramux")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit hosts
TRIM_NEVER = 2**31 - 1  # mallopt takes an int
HUGE_PAGE = 2 << 20  # x86-64 and arm64 transparent huge pages
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


_LIBC = _libc()
_policy = {"huge_pages": sys.platform.startswith("linux")}  # `apply("release")` turns them off


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed blocks for reuse (see the module docstring).
    False where the C library is not glibc (musl, macOS): nothing changed."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both apply to every arena, the engine thread's included; mallopt returns 1 on success.
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_NEVER) == 1


def apply(policy: str) -> None:
    """Set the host-memory policy for the process (`--host-memory`)."""
    _policy["huge_pages"] = policy == "keep" and sys.platform.startswith("linux")
    if policy == "keep":
        kept = keep_freed_memory()
        log.info("host memory: freed blocks %s; huge pages for long-lived buffers %s",
                 "kept for reuse" if kept else "as the C library does (not glibc)",
                 "asked" if _policy["huge_pages"] else "not asked (not Linux)")


def huge_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty` whose whole 2 MiB pages the kernel backs with transparent huge pages
    (where it has them in `madvise` mode, the usual default): a first touch then costs one
    fault per 2 MiB, not 512. Asked before anything writes it; elsewhere a plain tensor."""
    t = torch.empty(shape, dtype=dtype, device=device)
    madvise = getattr(_LIBC, "madvise", None)
    if t.device.type != "cpu" or madvise is None or not _policy["huge_pages"] or t.nbytes < 2 * HUGE_PAGE:
        return t
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + t.nbytes) // HUGE_PAGE * HUGE_PAGE
    if end > start:  # a refusal (no THP in this kernel) leaves ordinary pages: nothing to do
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(MADV_HUGEPAGE))
    return t
