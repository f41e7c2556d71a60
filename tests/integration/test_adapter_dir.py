"""Acceptance 5: a folder copied into --adapter-dir becomes usable; removing it unregisters it."""

from __future__ import annotations

import shutil

import grpc
import pytest

from tests.server import ServerProcess, wait_for


def test_folder_appears_and_disappears(tmp_path, adapter_store, reference):
    adapters = tmp_path / "adapters"
    shutil.copytree(adapter_store["r4-qv"], adapters / "at-start")
    srv = ServerProcess(tmp_path, "--adapter-dir", str(adapters), "--adapter-scan-interval", "0.5")
    try:
        with srv.client() as client:
            assert [a.adapter_id for a in client.list()] == ["at-start"]
            # Copy under a hidden name, then rename: what a careful deployer does. A plain
            # copy also works: a half-copied folder fails validation and is retried.
            shutil.copytree(adapter_store["r16-all"], adapters / ".incoming")
            (adapters / ".incoming").rename(adapters / "dropped-in")
            assert wait_for(lambda: "dropped-in" in {a.adapter_id for a in client.list()})
            answer = client.generate("Hello world", "dropped-in", max_new_tokens=12)
            assert list(answer.token_ids) == reference.generate("r16-all", "Hello world", 12)
            info = next(a for a in client.list() if a.adapter_id == "dropped-in")
            assert info.source == "dir" and info.rank == 16

            shutil.copytree(adapter_store["r32-kv"], adapters / "plain-copy")
            assert wait_for(lambda: "plain-copy" in {a.adapter_id for a in client.list()})

            shutil.rmtree(adapters / "dropped-in")
            assert wait_for(lambda: "dropped-in" not in {a.adapter_id for a in client.list()})
            with pytest.raises(grpc.RpcError) as err:
                client.generate("Hello world", "dropped-in", max_new_tokens=4)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert client.generate("Hello world", "at-start", max_new_tokens=4).generated_tokens >= 1
    finally:
        srv.stop()
