"""Shared fixtures: the test-built base model, real PEFT adapters, the PEFT oracle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from loramux.model.cache import default_cache_dir
from tests.adapters import make_adapter

# The real default model is converted once into the user's model cache (read before any
# fixture points LORAMUX_CACHE at a temporary folder), so test runs after the first reuse it.
REAL_MODEL_CACHE = Path(os.environ.get("LORAMUX_REAL_MODEL_CACHE") or default_cache_dir())
REAL_MODEL = "smollm2-135m-instruct"

# Different ranks, target sets, rsLoRA: what the parity and cache tests mix in one batch.
ADAPTERS = {
    "r4-qv": {"rank": 4, "targets": ("q_proj", "v_proj")},
    "r16-all": {"rank": 16, "targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")},
    "r64-mlp": {"rank": 64, "targets": ("down_proj", "up_proj")},
    "r8-rs": {"rank": 8, "targets": ("q_proj", "o_proj"), "use_rslora": True},
    "r32-kv": {"rank": 32, "targets": ("k_proj", "v_proj", "gate_proj")},
}


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Models are built here, never downloaded; server subprocesses inherit the variable."""
    path = Path(os.environ.get("LORAMUX_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["LORAMUX_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def base_path(cache_dir) -> Path:
    from loramux.model.tiny import ensure_tiny_model

    return ensure_tiny_model("tiny")


@pytest.fixture(scope="session")
def adapter_store(tmp_path_factory, base_path) -> dict[str, Path]:
    """Folder of PEFT adapters (saved by PEFT itself) keyed by adapter id."""
    root = tmp_path_factory.mktemp("adapter-src")
    return {name: make_adapter(base_path, root / name, seed=i, **spec)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def reference(base_path, adapter_store):
    from tests.reference import PeftReference

    return PeftReference(base_path, adapter_store)


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (built from its PyPI package on first use)."""
    from loramux.model.gguf import ensure_gguf_model

    return ensure_gguf_model(REAL_MODEL, REAL_MODEL_CACHE)
