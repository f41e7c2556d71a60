"""Chat messages: rendered with the model's chat template on the server, through gRPC, the
Python client and `loramux chat`, token for token what the same conversation rendered by
the caller and sent as a prompt gives."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import grpc
import pytest
from transformers import AutoTokenizer

from loramux.client import AdapterNotFound, AsyncClient, InvalidRequest
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from loramux.pb.loramux.v1 import loramux_pb2_grpc as pb_grpc
from tests.server import ServerProcess

S = grpc.StatusCode
CONVERSATION = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "user", "content": "Tell me a story"},
]
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory, base_path):
    work = tmp_path_factory.mktemp("chat")
    srv = ServerProcess(work, "--model", "tiny", "--adapter-dir", str(work / "adapters"),
                        "--adapter-scan-interval", "0", "--max-model-len", str(MAX_MODEL_LEN))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tokenizer(base_path):
    return AutoTokenizer.from_pretrained(base_path)


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)


def rendered(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def wire(messages) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages]


def greedy(n: int = 16) -> pb.SamplingParams:
    return pb.SamplingParams(max_new_tokens=n)


def invalid(call, req) -> str:
    """The details of an INVALID_ARGUMENT answer (anything else fails the test)."""
    with pytest.raises(grpc.RpcError) as err:
        answer = call(req, timeout=30)
        if not isinstance(answer, pb.GenerateResponse):
            list(answer)  # a stream fails on its first read
    assert err.value.code() == S.INVALID_ARGUMENT, err.value.details()
    assert "Traceback" not in err.value.details()
    return err.value.details()


def test_chat_equals_the_conversation_rendered_by_the_caller(stub, tokenizer):
    text = rendered(tokenizer, CONVERSATION)
    as_prompt = stub.Generate(pb.GenerateRequest(prompt=text, params=greedy()), timeout=60)
    as_chat = stub.Generate(pb.GenerateRequest(messages=wire(CONVERSATION), params=greedy()), timeout=60)
    assert list(as_chat.token_ids) == list(as_prompt.token_ids) and len(as_chat.token_ids) >= 1
    assert as_chat.text == as_prompt.text and as_chat.finish_reason == as_prompt.finish_reason
    assert as_chat.prompt_tokens == as_prompt.prompt_tokens == len(tokenizer(text).input_ids)
    streamed = list(stub.GenerateStream(pb.GenerateRequest(messages=wire(CONVERSATION), params=greedy()),
                                        timeout=60))
    assert "".join(m.text for m in streamed) == as_chat.text
    assert [t for m in streamed for t in m.token_ids] == list(as_chat.token_ids)
    assert streamed[-1].finish_reason == as_chat.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    # Special tokens (BOS, EOS) never reach the text, whether or not the answer hit EOS.
    assert not any(s in as_chat.text for s in tokenizer.all_special_tokens)


def test_invalid_chat_requests(stub):
    user = [pb.ChatMessage(role="user", content="hi")]
    both = invalid(stub.Generate, pb.GenerateRequest(prompt="hi", messages=user, params=greedy()))
    assert "prompt" in both and "messages" in both and "not both" in both
    neither = invalid(stub.Generate, pb.GenerateRequest(params=greedy()))
    assert "empty" in neither and "prompt" in neither and "messages" in neither
    tool = [*user, pb.ChatMessage(role="tool", content="42")]
    bad_role = invalid(stub.Generate, pb.GenerateRequest(messages=tool, params=greedy()))
    assert "messages[1]" in bad_role and "'tool'" in bad_role
    assert all(r in bad_role for r in ("system", "user", "assistant"))
    no_role = invalid(stub.GenerateStream, pb.GenerateRequest(messages=[pb.ChatMessage(content="hi")]))
    assert "messages[0]" in no_role and "empty role" in no_role
    long = [pb.ChatMessage(role="user", content="x" * MAX_MODEL_LEN)]
    too_long = invalid(stub.Generate, pb.GenerateRequest(messages=long, params=greedy()))
    assert "conversation" in too_long and "tokens" in too_long
    # ...and the server serves on.
    assert stub.Generate(pb.GenerateRequest(messages=user, params=greedy(4)), timeout=60).generated_tokens >= 1


def test_model_without_chat_template(tmp_path, base_path):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for f in base_path.iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).symlink_to(f)
    config = json.loads((base_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    srv = ServerProcess(tmp_path / "work", "--model", str(folder), "--adapter-dir", str(tmp_path / "adapters"),
                        "--adapter-scan-interval", "0")
    try:
        with grpc.insecure_channel(srv.address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            chat = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")], params=greedy(4))
            details = invalid(stub.Generate, chat)
            assert "no chat template" in details and "prompt" in details
            assert stub.Generate(pb.GenerateRequest(prompt="hi", params=greedy(4)), timeout=60).generated_tokens
    finally:
        srv.stop()


def test_client_chat_sync(server, tokenizer):
    with server.client() as c:
        expected = c.generate(rendered(tokenizer, CONVERSATION), max_new_tokens=12)
        answer = c.chat(CONVERSATION, max_new_tokens=12)
        assert list(answer.token_ids) == list(expected.token_ids) and answer.text == expected.text
        pairs = [(m["role"], m["content"]) for m in CONVERSATION]
        pieces = list(c.chat_stream(pairs, max_new_tokens=12))
        assert "".join(m.text for m in pieces) == answer.text
        assert [t for m in pieces for t in m.token_ids] == list(answer.token_ids)
        with pytest.raises(InvalidRequest) as err:
            c.chat([("robot", "hi")], max_new_tokens=4)
        assert "'robot'" in err.value.details()
        with pytest.raises(InvalidRequest):
            list(c.chat_stream([], max_new_tokens=4))  # no messages and no prompt
        with pytest.raises(AdapterNotFound):
            c.chat(CONVERSATION, "nope", max_new_tokens=4)


def test_client_chat_async(server, tokenizer):
    async def main():
        async with AsyncClient(server.address) as c:
            expected = await c.generate(rendered(tokenizer, CONVERSATION), max_new_tokens=12)
            answer = await c.chat(CONVERSATION, max_new_tokens=12)
            pieces = [m async for m in c.chat_stream(CONVERSATION, max_new_tokens=12)]
            with pytest.raises(InvalidRequest):
                await c.chat([{"role": "", "content": "hi"}], max_new_tokens=4)
            with pytest.raises(AdapterNotFound):
                async for _ in c.chat_stream(CONVERSATION, "nope", max_new_tokens=4):
                    pass
            return expected, answer, pieces

    expected, answer, pieces = asyncio.run(main())
    assert list(answer.token_ids) == list(expected.token_ids) and answer.text == expected.text
    assert "".join(m.text for m in pieces) == answer.text
    assert [t for m in pieces for t in m.token_ids] == list(answer.token_ids)


def run_chat(server, stdin: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "loramux", "chat", "--address", server.address, "--max-new-tokens", "8", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)


def test_cli_chat_reset(server):
    out = run_chat(server, "hello\n/reset\nhi\n")
    assert out.returncode == 0, out.stderr
    with server.client() as c:
        first = c.chat([("user", "hello")], max_new_tokens=8).text
        second = c.chat([("user", "hi")], max_new_tokens=8).text  # the reset dropped "hello"
    assert out.stdout == f"{first}\n(history cleared)\n{second}\n"
    assert out.stderr == ""


def test_cli_chat_keeps_history_and_drops_a_failed_turn(server):
    system = "Be brief."
    out = run_chat(server, "hello\n" + "x" * MAX_MODEL_LEN + "\nhi\n", "--system", system)
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("loramux: INVALID_ARGUMENT: ") and "tokens" in out.stderr
    assert "Traceback" not in out.stderr
    with server.client() as c:
        first = c.chat([("system", system), ("user", "hello")], max_new_tokens=8).text
        history = [("system", system), ("user", "hello"), ("assistant", first), ("user", "hi")]
        second = c.chat(history, max_new_tokens=8).text
    assert out.stdout == f"{first}\n{second}\n"


def test_cli_chat_error_keeps_going(server):
    out = run_chat(server, "hello\nhi\n", "--adapter", "nope")
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr.count("loramux: NOT_FOUND: ") == 2, out.stderr
