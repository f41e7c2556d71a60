"""The model cache: where named models are built, and building a folder there exactly once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

MARKER = "loramux-source.json"  # what a folder was built from; a different source builds it again


def default_cache_dir() -> Path:
    root = os.environ.get("LORAMUX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "loramux"
    )
    return Path(root) / "models"


def build_once(folder: Path, source: dict, build: Callable[[Path], None]) -> Path:
    """Return `folder`, first calling `build(tmp)` unless it was already built from `source`.

    `build` writes into a temporary sibling that is renamed into place only when complete, so
    an interrupted or failed build never leaves a folder that looks finished.
    """
    marker = folder / MARKER
    if marker.exists() and json.loads(marker.read_text()) == source:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp / "model")
        (tmp / "model" / MARKER).write_text(json.dumps(source))
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp / "model", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
