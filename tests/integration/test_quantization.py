"""--quantization fp4 | int8 | none serve the same answers as PEFT on the same base."""

from __future__ import annotations

import shutil

import pytest

from tests.reference import PeftReference
from tests.server import ServerProcess


@pytest.mark.parametrize("quantization", ["fp4", "int8", "none"])
def test_quantization_modes(tmp_path, base_path, adapter_store, quantization):
    shutil.copytree(adapter_store["r16-all"], tmp_path / "adapters" / "r16-all")
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--quantization", quantization)
    try:
        ref = PeftReference(base_path, {"r16-all": adapter_store["r16-all"]}, quantization=quantization)
        with srv.client() as client:
            for adapter_id in ("", "r16-all"):
                answer = client.generate("Once upon a time", adapter_id, max_new_tokens=16)
                assert list(answer.token_ids) == ref.generate(adapter_id, "Once upon a time", 16)
        memory = srv.metrics()["loramux_model_memory_bytes"]
        full = (base_path / "model.safetensors").stat().st_size  # float32 weights on disk
        assert memory == pytest.approx(full, rel=0.05) if quantization == "none" else memory < 0.6 * full
    finally:
        srv.stop()
