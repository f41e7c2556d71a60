"""Running a real `loramux serve` process on a loopback ephemeral port, for tests and benches."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loramux.client import Client, Retry


def free_port() -> int:
    """A port free now (--http-port takes no 0: 0 turns HTTP off)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Owns one server subprocess: start, wait until SERVING, address, metrics, stop."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None, timeout: float = 180,
                 command: list[str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.ready = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        if command is None:
            # Tests serve the random-weight `tiny` model unless they name another one, with
            # room for the test adapters' ranks (up to 64) unless they say otherwise.
            model = () if "--model" in args else ("--model", "tiny")
            rank = () if "--max-lora-rank" in args else ("--max-lora-rank", "64")
            command = [sys.executable, "-m", "loramux", "serve", "--port", "0", *model, *rank]
        cmd = [*command, "--metrics-port", "0", "--ready-file", str(self.ready), *args]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self._wait_ready(timeout)
        info = json.loads(self.ready.read_text())
        self.port, self.metrics_port = info["port"], info["metrics_port"]
        self.http_port = info.get("http_port", 0)  # with --http-port
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.http_port}"

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def client(self, timeout: float = 120, retry: Retry | None = None) -> Client:
        """Retries off unless asked: tests look at the first answer."""
        return Client(self.address, timeout=timeout, retry=retry or Retry(attempts=1))

    def health(self, service: str = "") -> int:
        with grpc.insecure_channel(self.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def metrics(self) -> dict[str, float]:
        """Scrape /metrics into {series: value} (labels kept in the series name)."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Polls `predicate` until it holds (True) or `timeout` seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False
