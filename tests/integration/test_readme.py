"""Acceptance 6: the README's serve command reaches SERVING and answers `loramux generate`."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]


def test_readme_opens_with_serve_and_test_commands():
    serve, test = readme_commands()[:2]
    assert serve == "./scripts/serve.sh" and test == "./scripts/test.sh"
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_readme_serve_command_serves(tmp_path):
    # The README's first command, as written, plus an ephemeral port for the test.
    serve = readme_commands()[0]
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"),
                        command=[str(ROOT / serve.removeprefix("./")), "--port", "0"])
    try:
        assert srv.health() == 1  # SERVING
        out = subprocess.run([sys.executable, "-m", "loramux", "generate", "--address", srv.address,
                              "--max-new-tokens", "8", "Hello"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip()
        adapters = subprocess.run([sys.executable, "-m", "loramux", "adapters", "--address", srv.address, "list"],
                                  capture_output=True, text=True, timeout=60)
        assert adapters.returncode == 0
        health = subprocess.run([sys.executable, "-m", "loramux", "health", "--address", srv.address],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.log()
    assert "draining" in srv.log()
