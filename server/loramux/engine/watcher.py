"""Registration by file: folders in --adapter-dir come and go as adapters."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from loramux.errors import LoramuxError
from loramux.lora.files import CONFIG_FILE
from loramux.model.threads import single_threaded

log = logging.getLogger(__name__)


def _signature(folder: Path) -> tuple:
    """Changes whenever a file in the folder is added, removed, resized or rewritten."""
    try:
        return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()))
    except OSError:
        return ()


class AdapterDirWatcher:
    """Owns the set of adapters that came from --adapter-dir; polls it every interval.

    A folder is registered under its name once its files validate; a folder still being
    copied fails validation and is retried when its files change. A removed folder is
    unregistered (requests already running on it finish first).
    """

    def __init__(self, engine, folder: Path, interval: float) -> None:
        self.engine = engine
        self.folder = folder
        self.interval = interval
        self._seen: dict[str, tuple] = {}  # folder name -> signature at the last attempt
        self._owned: set[str] = set()
        self._scan_lock = threading.Lock()  # scans and adoptions never interleave
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loramux-adapter-dir", daemon=True)

    def start(self) -> None:
        self.scan()
        if self.interval > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        single_threaded()  # validating adapter files must not start a second OpenMP team
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:
                log.exception("adapter folder scan failed")

    def scan(self) -> None:
        with self._scan_lock:
            self._scan()

    def _scan(self) -> None:
        present = {p.name: p for p in self._candidates()}
        for name in sorted(self._owned - present.keys()):
            self._owned.discard(name)
            self._seen.pop(name, None)
            self._unregister(name)
        for name, path in sorted(present.items()):
            sig = _signature(path)
            if self._seen.get(name) == sig:
                continue
            self._seen[name] = sig
            if name in self._owned:  # rewritten in place: register the new files
                self._owned.discard(name)
                self._unregister(name)
            self._register(name, path)

    def adopt(self, name: str):
        """Register a folder just placed in --adapter-dir (an upload) now, as the watcher's own.

        Raises what registration raises; the caller removes the folder then."""
        with self._scan_lock:
            path = self.folder / name
            record = self.engine.register(name, path, source="dir")
            self._owned.add(name)
            self._seen[name] = _signature(path)
            return record

    def _candidates(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / CONFIG_FILE).exists()]

    def _register(self, name: str, path: Path) -> None:
        try:
            self.engine.register(name, path, source="dir")
        except LoramuxError as exc:
            log.warning("adapter folder %s not registered: %s", path, exc)
            return
        self._owned.add(name)
        log.info("registered adapter %r from %s", name, path)

    def _unregister(self, name: str) -> None:
        try:
            self.engine.unregister(name)
            log.info("unregistered adapter %r: its folder is gone", name)
        except LoramuxError:
            pass
