"""Property: whatever requests and adapter folders are thrown at it, the server answers
with a documented status and keeps serving right; degenerate text is answered or refused
with INVALID_ARGUMENT at submit, never INTERNAL."""

from __future__ import annotations

import json
import operator
import re
import shutil
import string
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
LIMIT = 256  # the server's --max-model-len: a prompt may have LIMIT - 1 tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("property")
    shutil.copytree(adapter_store["r4-qv"], work / "adapters" / "good")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--adapter-scan-interval", "0",
                        "--max-new-tokens-limit", "64", "--max-model-len", str(LIMIT))
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


# peft_type is mostly "LORA": without it the folder is refused before the other fields are read.
configs = st.fixed_dictionaries({"peft_type": st.sampled_from(["LORA"] * 4 + ["IA3", 3])}, optional={
    "r": st.integers(-2, 300) | st.floats() | st.text(),
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


# --- degenerate text: answered, or INVALID_ARGUMENT with a reason; never INTERNAL ----------

SPECIALS = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u3000\ufeff"


def surrogates_replaced(text: str) -> str:
    """What a client must send instead of lone surrogates (protobuf strings are UTF-8)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


degenerate = st.one_of(
    st.just(""),
    st.text(alphabet=WHITESPACE, min_size=1, max_size=300),
    st.text(alphabet=st.characters(categories=["Cc", "Cf", "Zl", "Zp"]), min_size=1, max_size=300),
    st.text(alphabet=st.characters(categories=["Cs", "Co", "Cn"]), min_size=1, max_size=100).map(surrogates_replaced),
    st.lists(st.sampled_from(SPECIALS), min_size=1, max_size=40).map("".join),
    st.builds(operator.mul, st.characters(exclude_categories=["Cs"]), st.integers(100, 3000)),  # one long "word"
    st.text(alphabet=string.ascii_letters + string.digits, min_size=200, max_size=3000),
    st.integers(-3, 3).map(lambda d: "w" * (LIMIT - 2 + d)),  # around the length limit
)


def answered_or_refused(call, req) -> str:
    """"" when answered; the reason when refused with INVALID_ARGUMENT; fails on anything else."""
    try:
        response = call(req, timeout=60)
        if not isinstance(response, pb.GenerateResponse):
            list(response)  # a stream: read it to its end (an error may come after messages)
    except grpc.RpcError as err:
        assert err.code() == S.INVALID_ARGUMENT, (err.code(), err.details())
        assert err.details() and "Traceback" not in err.details()
        return err.details()
    return ""


def calls(server):
    ch = grpc.insecure_channel(server.address)
    unary = ch.unary_unary("/loramux.v1.Generation/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                           response_deserializer=pb.GenerateResponse.FromString)
    stream = ch.unary_stream("/loramux.v1.Generation/GenerateStream",
                             request_serializer=pb.GenerateRequest.SerializeToString,
                             response_deserializer=pb.GenerateStreamResponse.FromString)
    return ch, unary, stream


@SETTINGS
@given(text=degenerate, new=st.integers(1, 64), adapter=st.sampled_from(["", "good"]), stream=st.booleans(),
       as_chat=st.booleans())
def test_degenerate_text(server, text, new, adapter, stream, as_chat):
    req = pb.GenerateRequest(adapter_id=adapter, params=pb.SamplingParams(max_new_tokens=new))
    if as_chat:
        req.messages.append(pb.ChatMessage(role="user", content=text))
    else:
        req.prompt = text
    ch, unary, streaming = calls(server)
    with ch:
        why = answered_or_refused(streaming if stream else unary, req)
    if not text and not as_chat:
        assert "empty" in why
    elif why:
        assert "tokens" in why, why  # the only refusal of a non-empty text here: too long


@SETTINGS
@given(extra=st.integers(-4, 4), char=st.sampled_from(["a", "\u00e9", "\u20ac", "\U0001f600", "\x00"]),
       new=st.integers(1, 64))
def test_prompts_at_the_length_limit(server, extra, char, new):
    # tiny's tokenizer: BOS, then a token per UTF-8 byte
    prompt = char * ((LIMIT - 2 + extra) // len(char.encode()))
    tokens = 1 + len(prompt.encode())
    ch, unary, _ = calls(server)
    with ch:
        why = answered_or_refused(unary, pb.GenerateRequest(prompt=prompt,
                                                            params=pb.SamplingParams(max_new_tokens=new)))
        if tokens <= LIMIT - 1:
            assert not why
        else:
            assert f"prompt is {tokens} tokens" in why and f"at most {LIMIT - 1}" in why


def test_text_the_tokenizer_drops_entirely(tmp_path, base_path):
    """A model whose tokenizer strips whitespace and adds no BOS turns "  " into no token:
    refused at submit, not a failed model step."""
    folder = tmp_path / "stripping"
    shutil.copytree(base_path, folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    tok["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    srv = ServerProcess(tmp_path / "work", "--model", str(folder), "--adapter-dir", str(tmp_path / "adapters"),
                        "--adapter-scan-interval", "0")
    try:
        ch, unary, stream = calls(srv)
        with ch:
            for call in (unary, stream):
                for text in (" ", "\n\t \r\n"):
                    why = answered_or_refused(call, pb.GenerateRequest(prompt=text))
                    assert "empty once tokenized" in why
            assert not answered_or_refused(unary, pb.GenerateRequest(prompt=" hi "))
    finally:
        srv.stop()


def test_still_serving_after_the_storm(server, reference):
    with server.client() as c:
        answer = c.generate("Hello world", "good", max_new_tokens=12)
        assert list(answer.token_ids) == reference.generate("r4-qv", "Hello world", 12)
        assert [a.adapter_id for a in c.list()] == ["good"]
