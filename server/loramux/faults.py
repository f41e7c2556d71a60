"""Deliberate failures for fault-injection tests; inert unless LORAMUX_FAULTS is set.

LORAMUX_FAULTS is a comma-separated list of
  step:MARKER          a prefill step raises when a prompt in it contains MARKER
  crash:MARKER         the decode loop raises outside its own error handling when a
                       row whose prompt contains MARKER joins the batch (the last-resort path)
  join:MARKER          joining the batch fails for the rows prefilled with a prompt
                       containing MARKER (e.g. out of memory growing the KV buffers)
  admit:MARKER         admitting a request whose prompt contains MARKER raises (a stand-in for a
                       bug between the queue and the prefill)
  load-oom:ID:N        the first N loads of adapter ID raise out-of-memory
"""

from __future__ import annotations

import os
import threading

_lock = threading.Lock()
_spec = [f.split(":") for f in os.environ.get("LORAMUX_FAULTS", "").split(",") if f]
_counts: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """Raised where a test asked for a failure."""


def marked(prompt: str) -> str:
    """The kind of fault ("step", "crash", "join", "admit") a prompt asks for; "" for none."""
    kinds = ("step", "crash", "join", "admit")
    return next((f[0] for f in _spec if f[0] in kinds and len(f) == 2 and f[1] in prompt), "")


def load_should_oom(adapter_id: str) -> bool:
    for f in _spec:
        if f[0] == "load-oom" and len(f) == 3 and f[1] == adapter_id:
            with _lock:
                _counts[adapter_id] = _counts.get(adapter_id, 0) + 1
                return _counts[adapter_id] <= int(f[2])
    return False
