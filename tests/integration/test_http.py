"""Issue 17: the OpenAI-compatible HTTP front door (the official `openai` SDK as the client)
and token logprobs on gRPC, on one real server with both front doors."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx2 as httpx  # the HTTP client the openai SDK itself uses
import openai
import pytest

from loramux.client import Client, Retry
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess, free_port

BASE = "tiny"  # the served model's name: `model` for the bare base
ADAPTERS = ("r4-qv", "r16-all", "r8-rs")
TOKEN = "s3cret-admin"
PROMPTS = ["Hello world", "The quick brown fox", "Once upon a time", "1 2 3 4"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}]
FINISH = {pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "stop", pb.FINISH_REASON_STOP: "stop"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("http")
    for name in ADAPTERS:
        shutil.copytree(adapter_store[name], work / "adapters" / name)
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--http-port", str(free_port()),
                        "--max-batch-size", "4", "--max-queue", "12", "--admin-token", TOKEN,
                        "--adapter-scan-interval", "0", "--drain-timeout", "5",
                        "--allow-adapter-root", str(adapter_store["r32-kv"].parent))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    with openai.OpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def model_of(adapter_id: str) -> str:
    return adapter_id or BASE


# --- acceptance 1: the SDK against gRPC's answers ----------------------------------------
@pytest.mark.parametrize("adapter_id", ["", "r16-all"])
def test_sdk_answers_equal_grpc(server, oai, adapter_id):
    with server.client() as client:
        want = client.chat(CHAT, adapter_id, max_new_tokens=24)
        chat = oai.chat.completions.create(model=model_of(adapter_id), messages=CHAT, max_tokens=24, temperature=0)
        assert chat.choices[0].message.content == want.text and chat.choices[0].message.role == "assistant"
        assert chat.choices[0].finish_reason == FINISH[want.finish_reason] and chat.model == model_of(adapter_id)
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (want.prompt_tokens, want.generated_tokens)
        assert chat.usage.total_tokens == want.prompt_tokens + want.generated_tokens
        assert chat.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt just went over gRPC
        chunks = list(oai.chat.completions.create(model=model_of(adapter_id), messages=CHAT, max_tokens=24,
                                                  temperature=0, stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == FINISH[want.finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.generated_tokens

        for prompt in PROMPTS[:2]:
            want = client.generate(prompt, adapter_id, max_new_tokens=16)
            done = oai.completions.create(model=model_of(adapter_id), prompt=prompt, max_tokens=16, temperature=0)
            assert done.choices[0].text == want.text and done.object == "text_completion"
            assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (want.prompt_tokens,
                                                                                want.generated_tokens)
            streamed = oai.completions.create(model=model_of(adapter_id), prompt=prompt, max_tokens=16,
                                              temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == want.text


def test_async_sdk_concurrent(server):
    """AsyncOpenAI, streaming and not, many requests at once over the base and adapters."""
    jobs = [(a, p) for a in ("", *ADAPTERS) for p in PROMPTS[:2]]
    with server.client() as client:
        want = [client.generate(p, a, max_new_tokens=12).text for a, p in jobs]

    async def run():
        room = asyncio.Semaphore(8)  # within 4 rows and the queue of 12: no 429 here
        async with openai.AsyncOpenAI(base_url=server.http_url + "/v1", api_key="unused", max_retries=0) as aoai:
            async def unary(a, p):
                async with room:
                    r = await aoai.completions.create(model=model_of(a), prompt=p, max_tokens=12, temperature=0)
                return r.choices[0].text

            async def streamed(a, p):
                async with room:
                    stream = await aoai.chat.completions.create(
                        model=model_of(a), messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0,
                        stream=True)
                    return "".join([c.choices[0].delta.content or "" async for c in stream])

            async def chat(a, p):
                async with room:
                    r = await aoai.chat.completions.create(
                        model=model_of(a), messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0)
                return r.choices[0].message.content

            return await asyncio.gather(*(unary(a, p) for a, p in jobs),
                                        *(asyncio.gather(streamed(a, p), chat(a, p)) for a, p in jobs))

    got = asyncio.run(run())
    assert got[:len(jobs)] == want
    assert all(s == c for s, c in got[len(jobs):])  # streamed deltas join to the unary text


# --- acceptance 2: logprobs against PEFT -------------------------------------------------
def test_grpc_logprobs_equal_peft_in_mixed_batches(server, reference):
    jobs = [(a, p, 5) for a, p in zip(("", *ADAPTERS) + ADAPTERS[:2], PROMPTS + PROMPTS[2:], strict=True)]
    jobs += [("r4-qv", "Hello world", None), ("", "1 2 3 4", None)]  # rows that do not ask, beside them
    assert len(jobs) <= 12  # the queue: no 429 here
    with server.client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: client.generate(j[1], j[0], max_new_tokens=10, top_logprobs=j[2]), jobs))
    for (adapter_id, prompt, k), answer in zip(jobs, answers, strict=True):
        assert list(answer.token_ids) == reference.generate(adapter_id, prompt, 10)
        if k is None:
            assert not answer.logprobs
            continue
        ref = reference.logprobs(adapter_id, prompt, list(answer.token_ids))
        assert [lp.token_id for lp in answer.logprobs] == list(answer.token_ids)
        for i, lp in enumerate(answer.logprobs):
            assert abs(lp.logprob - ref[i, lp.token_id].item()) < 1e-4, (adapter_id, prompt, i)
            assert len(lp.top) == k and lp.top[0].token_id == lp.token_id  # greedy: the argmax
            values = [t.logprob for t in lp.top]
            assert values == sorted(values, reverse=True)
            assert max(abs(t.logprob - ref[i, t.token_id].item()) for t in lp.top) < 1e-4
            assert abs(values[-1] - ref[i].topk(k).values[-1].item()) < 1e-4  # no likelier token left out


def test_grpc_logprobs_stream_and_limits(server):
    with server.client() as client:
        unary = client.generate("Hello world", "r8-rs", max_new_tokens=8, top_logprobs=0)
        assert len(unary.logprobs) == len(unary.token_ids) and all(not lp.top for lp in unary.logprobs)
        streamed = [lp for m in client.stream("Hello world", "r8-rs", max_new_tokens=8, top_logprobs=0)
                    for lp in m.logprobs]
        assert streamed == list(unary.logprobs)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hello world", max_new_tokens=4, top_logprobs=21)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs" in err.value.details()


def test_http_logprobs_equal_grpc(server, oai):
    # Within 1e-4, not to the bit: the second of two equal prompts prefills from the prefix cache.
    def approx(value: float):
        return pytest.approx(value, abs=1e-4)

    with server.client() as client:
        want = client.chat(CHAT, "r4-qv", max_new_tokens=8, top_logprobs=3)
        chat = oai.chat.completions.create(model="r4-qv", messages=CHAT, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
        got = chat.choices[0].logprobs.content
        assert [(c.token, c.logprob) for c in got] == [(lp.token, approx(lp.logprob)) for lp in want.logprobs]
        assert [[t.token for t in c.top_logprobs] for c in got] == [[t.token for t in lp.top] for lp in want.logprobs]
        want = client.generate("Hello world", "", max_new_tokens=8, top_logprobs=2)
        done = oai.completions.create(model=BASE, prompt="Hello world", max_tokens=8, temperature=0, logprobs=2)
        lp = done.choices[0].logprobs
        assert lp.tokens == [t.token for t in want.logprobs]
        assert lp.token_logprobs == [approx(t.logprob) for t in want.logprobs]
        assert [list(d) for d in lp.top_logprobs] == [[a.token for a in t.top] for t in want.logprobs]


# --- acceptance 3: errors, disconnects --------------------------------------------------
def expect_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["type"], str) and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


def test_http_errors(server):
    chat = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with server.client() as client, httpx.Client(base_url=server.http_url, timeout=30) as http:
        def post(path: str, **body) -> httpx.Response:
            return http.post(path, json=body)

        msg = expect_error(post("/v1/chat/completions", **{**chat, "model": "nope"}), 404)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", "nope")
        assert msg == err.value.details()  # the same message as gRPC
        msg = expect_error(post("/v1/chat/completions", **{**chat, "temperature": -1}), 400)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("hi", temperature=-1)
        assert msg == err.value.details()
        assert expect_error(post("/v1/chat/completions", **chat, n=2, tools=[{"type": "function"}]), 400) == (
            "unsupported parameter(s): tools, n")
        assert "top_logprobs" in expect_error(post("/v1/chat/completions", **chat, logprobs=True, top_logprobs=21),
                                              400)
        assert "messages" in expect_error(post("/v1/chat/completions", model=BASE), 400)
        assert "role" in expect_error(post("/v1/chat/completions", model=BASE,
                                           messages=[{"role": "robot", "content": "hi"}]), 400)
        assert "max_new_tokens" in expect_error(post("/v1/completions", model=BASE, prompt="hi", max_tokens=0), 400)
        expect_error(http.post("/v1/completions", content=b"{not json"), 400)
        expect_error(http.get("/v1/nothing-here"), 404)
        with pytest.raises(openai.NotFoundError):  # what SDK users see
            openai.OpenAI(base_url=server.http_url + "/v1", api_key="x", max_retries=0).completions.create(
                model="nope", prompt="hi")


def test_models_and_admin_routes(server, adapter_store):
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert set(models) == {BASE, *ADAPTERS}
        assert models[BASE]["parent"] is None and all(models[a]["parent"] == BASE for a in ADAPTERS)
        assert all(m["object"] == "model" and m["owned_by"] == "loramux" for m in models.values())
        assert http.get("/health").json() == {"status": "ok"}

        load = {"lora_name": "r32-kv", "lora_path": str(adapter_store["r32-kv"])}
        assert "admin token" in expect_error(http.post("/v1/load_lora_adapter", json=load), 401)
        expect_error(http.post("/v1/load_lora_adapter", json=load, headers={"authorization": "Bearer wrong"}), 401)
        admin = {"authorization": f"Bearer {TOKEN}"}
        assert http.post("/v1/load_lora_adapter", json=load, headers=admin).json()["id"] == "r32-kv"
        expect_error(http.post("/v1/load_lora_adapter", json=load, headers=admin), 409)
        outside = {"lora_name": "etc", "lora_path": "/etc"}  # not under an allowed root
        msg = expect_error(http.post("/v1/load_lora_adapter", json=outside, headers=admin), 403)
        with Client(server.address, admin_token=TOKEN, retry=Retry(attempts=1)) as admin_client, \
                pytest.raises(grpc.RpcError) as err:
            admin_client.register("etc", "/etc")
        assert msg == err.value.details()  # the same message as gRPC
        assert "r32-kv" in {m["id"] for m in http.get("/v1/models").json()["data"]}
        answer = http.post("/v1/completions", json={"model": "r32-kv", "prompt": "hi", "max_tokens": 3}).json()
        assert answer["usage"]["completion_tokens"] >= 1
        expect_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "r32-kv"}), 401)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "r32-kv"}, headers=admin).status_code == 200
        expect_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "r32-kv"}, headers=admin), 404)


def wait_running(server, value: float = 0, timeout: float = 15) -> None:
    end = time.monotonic() + timeout
    while server.metrics()["loramux_running_requests"] != value and time.monotonic() < end:
        time.sleep(0.05)
    assert server.metrics()["loramux_running_requests"] == value


def long_grpc_streams(server, client, n: int) -> list:
    """n long gRPC streams, once the batch (4 rows) runs and the rest wait in the queue."""
    def start(k: int) -> list:
        return [client.stream("Once upon a time", "r4-qv", max_new_tokens=1000, ignore_eos=True) for _ in range(k)]

    streams = start(min(n, 4))
    wait_running(server, min(n, 4))
    streams += start(max(n - 4, 0))
    end = time.monotonic() + 15
    while server.metrics()["loramux_queue_depth"] != max(n - 4, 0):
        assert time.monotonic() < end
        time.sleep(0.05)
    return streams


def test_queue_full_is_429(server):
    with server.client() as client, httpx.Client(base_url=server.http_url, timeout=30) as http:
        streams = long_grpc_streams(server, client, 16)  # 4 rows running, 12 waiting: the queue is full
        try:
            msg = expect_error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2}),
                               429)
            assert "max-queue" in msg
        finally:
            for s in streams:
                s.cancel()
        wait_running(server)


def test_client_disconnect_frees_its_row(server):
    body = {"model": "r16-all", "messages": CHAT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    before = server.metrics().get('loramux_requests_total{frontend="http",status="CANCELLED"}', 0)
    with httpx.Client(base_url=server.http_url, timeout=30) as http:
        with contextlib.ExitStack() as open_streams:
            lines = [open_streams.enter_context(http.stream("POST", "/v1/chat/completions", json=body)).iter_lines()
                     for _ in range(3)]
            assert all(next(line).startswith("data: ") for line in lines)
            wait_running(server, 3)
        # the connections closed mid-stream
        wait_running(server)
        with pytest.raises(httpx.ReadTimeout):  # not streamed: the client gives up waiting
            http.post("/v1/chat/completions", json={**body, "stream": False}, timeout=1.0)
        wait_running(server)
        with server.client() as client:  # a stream still queued (no headers yet) when its client leaves
            busy = long_grpc_streams(server, client, 4)
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=body, timeout=1.0)
            end = time.monotonic() + 10
            while server.metrics()["loramux_queue_depth"] > 0:  # it leaves the queue, never admitted
                assert time.monotonic() < end
                time.sleep(0.05)
            for s in busy:
                s.cancel()
        wait_running(server)
    end = time.monotonic() + 5
    while server.metrics().get('loramux_requests_total{frontend="http",status="CANCELLED"}', 0) < before + 5:
        assert time.monotonic() < end
        time.sleep(0.05)


# --- acceptance 4: one engine, one set of metrics --------------------------------------
def test_http_and_grpc_share_batches_and_metrics(server, oai):
    def mixed_steps() -> float:  # decode steps with more than one row
        m = server.metrics()
        return m["loramux_batch_size_count"] - m['loramux_batch_size_bucket{le="1.0"}']

    def ok(frontend: str) -> float:
        return server.metrics().get(f'loramux_requests_total{{frontend="{frontend}",status="OK"}}', 0)

    steps, http_ok, grpc_ok = mixed_steps(), ok("http"), ok("grpc")
    tokens = server.metrics()["loramux_generated_tokens_total"]
    go = threading.Barrier(2)

    def over_http():
        go.wait()
        return oai.completions.create(model="r8-rs", prompt="Hello world", max_tokens=48, temperature=0,
                                      extra_body={"ignore_eos": True}).usage.completion_tokens

    def over_grpc():
        go.wait()
        return client.generate("The quick brown fox", "", max_new_tokens=48, ignore_eos=True).generated_tokens

    with server.client() as client, ThreadPoolExecutor(2) as pool:
        counts = [f.result() for f in [pool.submit(over_http), pool.submit(over_grpc)]]
    assert counts == [48, 48]
    assert mixed_steps() > steps  # one request per front door: a step with two rows held both
    assert ok("http") == http_ok + 1 and ok("grpc") == grpc_ok + 1
    assert server.metrics()["loramux_generated_tokens_total"] == tokens + 96


# --- last: draining (SIGTERM) -----------------------------------------------------------
def test_draining_answers_503(server):
    with server.client() as client, httpx.Client(base_url=server.http_url, timeout=30) as http:
        running = long_grpc_streams(server, client, 1)
        server.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while http.get("/health").status_code != 503:
            assert time.monotonic() < end
            time.sleep(0.05)
        assert http.get("/health").json() == {"status": "draining"}
        msg = expect_error(http.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2}), 503)
        assert "shutting down" in msg
        running[0].cancel()
    assert server.proc.wait(30) == 0
