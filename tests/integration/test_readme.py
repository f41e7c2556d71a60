"""The README's serve command, as written, serves the default model with the demo adapters and
answers `loramux generate` (issue 13, acceptance 1)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REAL_MODEL_CACHE
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
    # The README's first command, as written (the default model, the repository's adapters/),
    # plus an ephemeral port for the test; the model cache is the user's, as for a person.
    serve = readme_commands()[0]
    srv = ServerProcess(tmp_path, command=[str(ROOT / serve.removeprefix("./")), "--port", "0"],
                        env={"LORAMUX_CACHE": str(REAL_MODEL_CACHE.parent)}, timeout=900)
    try:
        assert srv.health() == 1  # SERVING
        assert "base model smollm2-135m-instruct (nf4" in srv.log()
        question = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        out = subprocess.run([sys.executable, "-m", "loramux", "generate", "--address", srv.address,
                              "--max-new-tokens", "24", question], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout, out.stdout
        adapters = subprocess.run([sys.executable, "-m", "loramux", "adapters", "--address", srv.address, "list"],
                                  capture_output=True, text=True, timeout=60)
        assert adapters.returncode == 0
        listed = {line.split("\t")[0] for line in adapters.stdout.splitlines()}
        assert {"uppercase", "json", "signoff"} <= listed, adapters.stdout
        health = subprocess.run([sys.executable, "-m", "loramux", "health", "--address", srv.address],
                                capture_output=True, text=True, timeout=60)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING"
    finally:
        code = srv.stop(signal.SIGTERM)
    assert code == 0, srv.log()
    assert "draining" in srv.log()
