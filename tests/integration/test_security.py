"""Issue 5 hostile input: admin token, TLS, malformed and extreme requests, size limits."""

from __future__ import annotations

import shutil
import ssl
import subprocess

import grpc
import httpx2 as httpx  # the HTTP client the openai SDK itself uses
import pytest

from loramux.client import Client
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess, free_port

S = grpc.StatusCode
TOKEN = "s3cret-token"
GENERATE = "/loramux.v1.Generation/Generate"


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("security")
    shutil.copytree(adapter_store["r4-qv"], work / "adapters" / "good")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--admin-token", TOKEN,
                        "--allow-adapter-root", str(adapter_store["r4-qv"].parent),
                        "--max-message-bytes", "65536", "--max-adapter-bytes", "200000",
                        "--adapter-scan-interval", "0")
    yield srv
    srv.stop()


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        assert "Traceback" not in (err.details() or "")
        return err.code()
    return S.OK


def test_admin_token(server, adapter_store):
    path = str(adapter_store["r8-rs"])
    with Client(server.address) as anonymous, Client(server.address, admin_token="wrong") as wrong:
        assert code_of(anonymous.register, "x", path) == S.UNAUTHENTICATED
        assert code_of(wrong.register, "x", path) == S.UNAUTHENTICATED
        assert code_of(anonymous.unregister, "good") == S.UNAUTHENTICATED
        assert [a.adapter_id for a in anonymous.list()] == ["good"]  # reads need no token
        assert anonymous.generate("Hi", "good", max_new_tokens=2).generated_tokens >= 1
    with Client(server.address, admin_token=TOKEN) as admin:
        assert admin.register("x", path).rank == 8
        admin.unregister("x")


def test_adapter_size_limit(server, adapter_store):
    with Client(server.address, admin_token=TOKEN) as admin:  # r64-mlp weights exceed 200000 bytes
        assert code_of(admin.register, "big", str(adapter_store["r64-mlp"])) == S.INVALID_ARGUMENT


def raw_generate(server, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary(GENERATE, request_serializer=None, response_deserializer=None)
        return code_of(call, payload, timeout=30)


def test_malformed_requests(server):
    ok = pb.GenerateRequest(adapter_id="good", prompt="Hi", params=pb.SamplingParams(max_new_tokens=2, stop=["X"]))
    data = ok.SerializeToString()
    assert raw_generate(server, data) == S.OK
    assert raw_generate(server, data.replace(b"X", b"\xff")) == S.INVALID_ARGUMENT  # invalid UTF-8
    assert raw_generate(server, b"\xff\xff\xff") == S.INVALID_ARGUMENT  # not protobuf at all
    assert raw_generate(server, data + b"\xa8\x1f\x07") == S.OK  # unknown field 501: ignored
    assert raw_generate(server, b"x" * 100_000) == S.RESOURCE_EXHAUSTED  # over --max-message-bytes


@pytest.mark.parametrize("prompt,params", [
    (" ", {"max_new_tokens": 3}),  # the shortest prompt (an empty one is INVALID_ARGUMENT: no prompt)
    ("Hi", {"temperature": 1e30, "top_k": 2**32 - 1, "seed": 2**64 - 1, "max_new_tokens": 3}),
    ("Hi", {"temperature": 1e-30, "top_p": 1e-30, "max_new_tokens": 3}),
    ("\u202e\x00\ud7ff\U0001f600", {"stop": ["", "\x00", "\U0001f600" * 10], "max_new_tokens": 3}),
])
def test_extreme_but_valid_requests(server, prompt, params):
    with server.client() as c:
        assert c.generate(prompt, "good", **params).generated_tokens >= 1


def test_tls(tmp_path, adapter_store):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--tls-cert", str(cert),
                        "--tls-key", str(key), "--http-port", str(free_port()))
    try:
        with Client(srv.address, tls_ca=cert.read_bytes()) as secure:
            assert secure.generate("Hello", max_new_tokens=4).generated_tokens >= 1
        with Client(srv.address, timeout=5) as plain:
            assert code_of(plain.generate, "Hello", max_new_tokens=4) == S.UNAVAILABLE
        # The HTTP front door takes the same certificate: HTTPS only.
        https = f"https://127.0.0.1:{srv.http_port}"
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4}
        answer = httpx.post(https + "/v1/completions", json=body, verify=ssl.create_default_context(cafile=cert))
        assert answer.json()["usage"]["completion_tokens"] >= 1
        with pytest.raises(httpx.HTTPError):
            httpx.post(f"http://127.0.0.1:{srv.http_port}/v1/completions", json=body, timeout=5)
    finally:
        srv.stop()
