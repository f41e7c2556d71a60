"""Adapter upload: chunks staged in a hidden folder, checked, then moved into --adapter-dir."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from loramux.errors import AlreadyExists, InvalidArgument, PermissionDenied
from loramux.lora.store import AdapterRecord

UPLOAD_FILES = frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md", "training_card.json"})
FOLDER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class Upload:
    """Owns one upload in progress: its staging folder, open files, byte count and hash."""

    def __init__(self, adapter_dir: Path, adapter_id: str, total_bytes: int, sha256: str, max_bytes: int) -> None:
        if not FOLDER_ID.match(adapter_id) or ".." in adapter_id:
            raise InvalidArgument(
                f"upload id {adapter_id[:64]!r} must be a folder name: letters, digits, '.', '_', '-'"
            )
        if total_bytes > max_bytes:
            raise InvalidArgument(f"upload of {total_bytes} bytes exceeds the limit of {max_bytes} bytes")
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
            raise InvalidArgument("header.sha256 must be 64 hex digits")
        self.adapter_dir = adapter_dir
        self.adapter_id = adapter_id
        self.declared, self.max_bytes, self.expected = total_bytes, max_bytes, sha256.lower()
        self.received = 0
        self.hash = hashlib.sha256()
        self.staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=adapter_dir))
        self._files: dict[str, object] = {}

    def write(self, file_name: str, data: bytes) -> None:
        _check_name(file_name)
        self.received += len(data)
        if self.received > min(self.declared, self.max_bytes):
            raise InvalidArgument(f"upload is larger than declared ({self.declared} bytes) or than the limit")
        if file_name not in self._files:
            self._files[file_name] = (self.staging / file_name).open("wb")
        self._files[file_name].write(data)
        self.hash.update(data)

    def finish(self, register) -> AdapterRecord:
        """Check size and hash, move the folder into --adapter-dir, register it with `register(id)`."""
        self._close()
        if self.received != self.declared:
            raise InvalidArgument(f"upload ended after {self.received} of {self.declared} declared bytes")
        if self.hash.hexdigest() != self.expected:
            raise InvalidArgument("SHA-256 of the uploaded data does not match header.sha256; nothing was stored")
        final = self.adapter_dir / self.adapter_id
        try:
            os.rename(self.staging, final)  # atomic; fails if the folder exists and is not empty
        except OSError:
            raise AlreadyExists(f"{final} already exists; unregister and remove it first") from None
        try:
            return register(self.adapter_id)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise

    def abort(self) -> None:
        self._close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith(".") or ".." in name:
        raise PermissionDenied(f"file name {name[:64]!r} is not a plain file name")
    if name not in UPLOAD_FILES:
        raise InvalidArgument(f"file {name!r} is not part of an adapter; send only {sorted(UPLOAD_FILES)}")
