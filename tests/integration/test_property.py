"""Property: whatever requests and adapter folders are thrown at it, the server answers
with a documented status and keeps serving right."""

from __future__ import annotations

import json
import shutil
import struct

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess

S = grpc.StatusCode
GENERATE_STATUSES = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED}
REGISTER_STATUSES = {S.OK, S.INVALID_ARGUMENT, S.ALREADY_EXISTS, S.PERMISSION_DENIED, S.NOT_FOUND}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("property")
    shutil.copytree(adapter_store["r4-qv"], work / "adapters" / "good")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--adapter-scan-interval", "0",
                        "--max-new-tokens-limit", "64", "--max-model-len", "256")
    srv.work = work
    yield srv
    srv.stop()


def status(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code()
    return S.OK


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
params = st.builds(
    pb.SamplingParams,
    max_new_tokens=st.integers(0, 200), temperature=floats, top_p=floats,
    top_k=st.integers(0, 2**32 - 1), seed=st.integers(0, 2**64 - 1),
    stop=st.lists(st.text(max_size=300), max_size=20),
)
chat = st.lists(st.builds(pb.ChatMessage, content=st.text(max_size=200),
                          role=st.sampled_from(["", "system", "user", "assistant", "tool"]) | st.text(max_size=20)),
                max_size=4)
requests = st.builds(
    pb.GenerateRequest,
    adapter_id=st.sampled_from(["", "good", "missing"]) | st.text(max_size=200),
    prompt=st.text(max_size=400), params=params, request_id=st.text(max_size=50), messages=chat,
)


@SETTINGS
@given(req=requests)
def test_random_generate_requests(server, req):
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_unary("/loramux.v1.Generation/Generate",
                              request_serializer=pb.GenerateRequest.SerializeToString,
                              response_deserializer=pb.GenerateResponse.FromString)
        assert status(call, req, timeout=60) in GENERATE_STATUSES


configs = st.fixed_dictionaries({}, optional={
    "peft_type": st.sampled_from(["LORA", "IA3", 3]), "r": st.integers(-2, 300) | st.floats() | st.text(),
    "lora_alpha": st.integers(-2, 300), "target_modules": st.lists(st.text(max_size=10)),
    "use_dora": st.booleans(), "bias": st.sampled_from(["none", "all"]), "use_rslora": st.booleans(),
})
header_entries = st.dictionaries(
    st.text(max_size=80) | st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]),
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "F16", "I8", "bogus"]),
                           "shape": st.lists(st.integers(-1, 2**40), max_size=3),
                           "data_offsets": st.lists(st.integers(-1, 2**40), min_size=2, max_size=2)}),
    max_size=4)


@SETTINGS
@given(config=configs | st.text(max_size=50), header=header_entries, tail=st.binary(max_size=512),
       header_len=st.none() | st.integers(0, 2**64 - 1))
def test_random_adapter_folders(server, config, header, tail, header_len):
    folder = server.work / "adapters" / "random"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(
        struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + tail)
    with server.client() as c:
        code = status(c.register, "random", str(folder))
        assert code in REGISTER_STATUSES
        if code == S.OK:
            c.unregister("random")


def test_still_serving_after_the_storm(server, reference):
    with server.client() as c:
        answer = c.generate("Hello world", "good", max_new_tokens=12)
        assert list(answer.token_ids) == reference.generate("r4-qv", "Hello world", 12)
        assert [a.adapter_id for a in c.list()] == ["good"]
