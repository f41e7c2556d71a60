"""Issue 6: the typed client (sync and asyncio, retries, errors) and adapter upload."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import threading
import time

import grpc
import pytest

from loramux.client import (
    AdapterNotFound,
    AsyncClient,
    Client,
    InvalidRequest,
    Overloaded,
    Retry,
    Unauthorized,
    upload_messages,
)
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess, wait_for

TOKEN = "tok"


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("client")
    shutil.copytree(adapter_store["r4-qv"], work / "adapters" / "r4-qv")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-batch-size", "1", "--max-queue", "1",
                        "--admin-token", TOKEN, "--max-adapter-bytes", "1500000", "--adapter-scan-interval", "0.5")
    srv.work = work
    yield srv
    srv.stop()


def test_sync_client(server, reference):
    with Client(server.address) as c:
        answer = c.generate("Hello world", "r4-qv", max_new_tokens=8)
        assert list(answer.token_ids) == reference.generate("r4-qv", "Hello world", 8)
        streamed = [t for m in c.stream("Hello world", "r4-qv", max_new_tokens=8) for t in m.token_ids]
        assert streamed == list(answer.token_ids)
        assert [a.adapter_id for a in c.list()] == ["r4-qv"]
        with pytest.raises(AdapterNotFound) as err:
            c.generate("Hello", "nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in err.value.details()
        with pytest.raises(InvalidRequest):
            c.generate("Hello", max_new_tokens=0)
        with pytest.raises(Unauthorized):
            c.unregister("r4-qv")


def test_async_client(server, reference):
    async def main():
        async with AsyncClient(server.address) as c:
            answer = await c.generate("Hello world", "r4-qv", max_new_tokens=8)
            streamed = [t async for m in c.stream("Hello world", "r4-qv", max_new_tokens=8) for t in m.token_ids]
            listed = await c.list()
            with pytest.raises(AdapterNotFound):
                await c.generate("Hello", "nope")
            return answer, streamed, listed

    answer, streamed, listed = asyncio.run(main())
    assert list(answer.token_ids) == streamed == reference.generate("r4-qv", "Hello world", 8)
    assert [a.adapter_id for a in listed] == ["r4-qv"]


def test_retries_with_backoff_on_overload(server):
    with Client(server.address, retry=Retry(attempts=1)) as impatient:
        # 1 running, then 1 queued behind it, both far longer than the test (ignore_eos: no
        # early EOS). Sent one after the other: sent together, either may take the row.
        busy = [impatient.stream("Once upon a time", max_new_tokens=800, ignore_eos=True)]
        next(busy[0])
        busy.append(impatient.stream("Once upon a time", max_new_tokens=800, ignore_eos=True))
        assert wait_for(lambda: server.metrics().get("loramux_queue_depth") == 1, timeout=30)
        with pytest.raises(Overloaded):
            impatient.generate("Hello", max_new_tokens=2)
        threading.Timer(0.8, lambda: [s.cancel() for s in busy]).start()
        patient = Client(server.address, retry=Retry(attempts=12, initial=0.1, maximum=0.5))
        start = time.monotonic()
        assert patient.generate("Hello", max_new_tokens=2).generated_tokens >= 1  # after a few backoffs
        assert time.monotonic() - start > 0.5
        patient.close()


def test_upload_good(server, adapter_store, reference):
    with Client(server.address, admin_token=TOKEN) as c:
        info = c.upload(adapter_store["r16-all"], "uploaded")
        assert info.adapter_id == "uploaded" and info.rank == 16 and info.source == "dir"
        assert (server.work / "adapters" / "uploaded" / "adapter_model.safetensors").is_file()
        answer = c.generate("Hello world", "uploaded", max_new_tokens=8)
        assert list(answer.token_ids) == reference.generate("r16-all", "Hello world", 8)
        with pytest.raises(grpc.RpcError) as err:
            c.upload(adapter_store["r16-all"], "uploaded")
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with Client(server.address) as anonymous, pytest.raises(Unauthorized):
        anonymous.upload(adapter_store["r8-rs"], "no-token")


def raw_upload(server, messages) -> grpc.StatusCode:
    with Client(server.address, admin_token=TOKEN, retry=Retry(attempts=1)) as c:
        try:
            c.registry.UploadAdapter(iter(messages), timeout=30, metadata=c._admin)
        except grpc.RpcError as err:
            return err.code()
    return grpc.StatusCode.OK


def test_upload_refusals_leave_nothing_behind(server, adapter_store):
    good = list(upload_messages(adapter_store["r8-rs"], "tricky"))
    header, chunks = good[0], good[1:]

    def renamed(name):
        return [header] + [pb.UploadAdapterRequest(chunk=pb.UploadChunk(file_name=name, data=m.chunk.data))
                           for m in chunks]

    wrong_hash = pb.UploadAdapterRequest(header=pb.UploadHeader(
        adapter_id="tricky", total_bytes=header.header.total_bytes, sha256="0" * 64))
    cases = {
        "wrong checksum": ([wrong_hash] + chunks, grpc.StatusCode.INVALID_ARGUMENT),
        "dot-dot": (renamed("../../evil.json"), grpc.StatusCode.PERMISSION_DENIED),
        "slash": (renamed("sub/adapter_model.safetensors"), grpc.StatusCode.PERMISSION_DENIED),
        "hidden": (renamed(".bashrc"), grpc.StatusCode.PERMISSION_DENIED),
        "pickle": (renamed("adapter_model.bin"), grpc.StatusCode.INVALID_ARGUMENT),
        "id with path": ([pb.UploadAdapterRequest(header=pb.UploadHeader(
            adapter_id="../x", total_bytes=1, sha256="0" * 64))], grpc.StatusCode.INVALID_ARGUMENT),
        "no header": (chunks, grpc.StatusCode.INVALID_ARGUMENT),
        "truncated": (good[:-1], grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (messages, expected) in cases.items():
        assert raw_upload(server, messages) == expected, name
    with Client(server.address, admin_token=TOKEN) as c, pytest.raises(InvalidRequest) as err:
        c.upload(adapter_store["r64-mlp"], "too-big")  # over --max-adapter-bytes
    assert "limit" in err.value.details()
    leftovers = [p.name for p in (server.work / "adapters").iterdir() if p.name.startswith(".upload")]
    assert leftovers == []
    assert not (server.work / "evil.json").exists()
    with Client(server.address) as c:
        assert {a.adapter_id for a in c.list()} <= {"r4-qv", "uploaded"}


def test_cli_upload_and_generate(server, adapter_store):
    env_cmd = [sys.executable, "-m", "loramux", "adapters", "--address", server.address, "--admin-token", TOKEN]
    out = subprocess.run([*env_cmd, "upload", str(adapter_store["r32-kv"]), "--id", "via-cli"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "via-cli" in out.stdout, out.stderr
    gen = subprocess.run([sys.executable, "-m", "loramux", "generate", "--address", server.address,
                          "--adapter", "via-cli", "--max-new-tokens", "6", "Hello"], capture_output=True, text=True,
                         timeout=60)
    assert gen.returncode == 0 and gen.stdout.strip()
    bad = subprocess.run([sys.executable, "-m", "loramux", "generate", "--address", server.address,
                          "--adapter", "nope", "Hello"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "NOT_FOUND" in bad.stderr and "Traceback" not in bad.stderr
