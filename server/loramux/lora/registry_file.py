"""The adapters registered by RPC, kept in a small JSON file so they survive a restart."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
FILE_NAME = ".loramux-registry.json"


def read(path: Path) -> dict[str, str]:
    """adapter id -> folder; an unreadable file is logged and treated as empty."""
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in data.get("adapters", {}).items()}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("ignoring unreadable registry file %s: %s", path, exc)
        return {}


def write(path: Path, adapters: dict[str, str]) -> None:
    """Write atomically: a crash leaves either the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(prefix=".loramux-registry-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "adapters": dict(sorted(adapters.items()))}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
