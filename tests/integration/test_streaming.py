"""Acceptance 3: streaming equals unary; stop strings and EOS end a stream; cancel frees a row."""

from __future__ import annotations

import shutil

import grpc
import pytest

from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess, wait_for

PROMPTS = ["Hello world", "The quick brown fox", "a", "Tell me a story about", "1 2 3 4",
           "Once upon a time", "xyz", "Good morning", "def f(x):", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("streaming")
    shutil.copytree(adapter_store["r16-all"], work / "adapters" / "r16-all")
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-batch-size", "4")
    yield srv
    srv.stop()


def collect(stream) -> tuple[str, list[int], list[int]]:
    texts, tokens, finishes = [], [], []
    for msg in stream:
        texts.append(msg.text)
        tokens += msg.token_ids
        finishes.append(msg.finish_reason)
    return "".join(texts), tokens, finishes


@pytest.mark.parametrize("adapter_id", ["", "r16-all"])
def test_stream_equals_unary(server, adapter_id):
    with server.client() as client:
        for prompt in PROMPTS[:5]:
            unary = client.generate(prompt, adapter_id, max_new_tokens=32)
            text, tokens, finishes = collect(client.stream(prompt, adapter_id, max_new_tokens=32))
            assert text == unary.text and tokens == list(unary.token_ids)
            assert finishes[-1] == unary.finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert all(f == pb.FINISH_REASON_UNSPECIFIED for f in finishes[:-1])
            assert len(finishes) == len(tokens)  # one message per decode step


def test_stop_string_ends_stream(server):
    with server.client() as client:
        prompt, full = next((p, r) for p, r in ((p, client.generate(p, max_new_tokens=40)) for p in PROMPTS)
                            if r.finish_reason == pb.FINISH_REASON_LENGTH and len(r.text) > 12)
        stop = full.text[6:9]
        cut = full.text.index(stop)
        unary = client.generate(prompt, max_new_tokens=40, stop=[stop, "never-seen"])
        text, tokens, finishes = collect(client.stream(prompt, max_new_tokens=40, stop=[stop]))
    assert unary.finish_reason == pb.FINISH_REASON_STOP and unary.text == full.text[:cut]
    assert finishes[-1] == pb.FINISH_REASON_STOP and text == full.text[:cut]
    assert len(tokens) < len(full.token_ids)


def test_eos_ends_stream(server):
    eos_id = 2  # the embedded model's </s>
    with server.client() as client:
        for prompt in PROMPTS:
            text, tokens, finishes = collect(client.stream(prompt, max_new_tokens=64))
            if finishes[-1] == pb.FINISH_REASON_EOS:
                assert tokens[-1] == eos_id and eos_id not in tokens[:-1]
                assert "</s>" not in text
                # ignore_eos: the same prompt goes on to max_new_tokens, the same tokens first
                _, longer, finishes = collect(client.stream(prompt, max_new_tokens=64, ignore_eos=True))
                assert finishes[-1] == pb.FINISH_REASON_LENGTH and len(longer) == 64
                assert longer[: len(tokens)] == tokens
                return
    pytest.fail("no prompt ended with EOS; the test model should produce one")


def test_cancelled_stream_frees_its_row(server):
    with server.client() as client:
        long_prompt = next(p for p in PROMPTS
                           if client.generate(p, max_new_tokens=300).finish_reason == pb.FINISH_REASON_LENGTH)
        streams = [client.stream(long_prompt, max_new_tokens=1000) for _ in range(4)]  # fills all 4 rows
        for s in streams:
            next(s)
        for s in streams:
            s.cancel()
        assert wait_for(lambda: server.metrics()["loramux_running_requests"] == 0, timeout=10)
        for s in streams:
            with pytest.raises(grpc.RpcError) as err:
                list(s)
            assert err.value.code() == grpc.StatusCode.CANCELLED
        answer = client.generate("Hello world", max_new_tokens=8)
        assert answer.generated_tokens >= 1
    assert server.metrics()['loramux_requests_total{frontend="grpc",status="CANCELLED"}'] >= 4
