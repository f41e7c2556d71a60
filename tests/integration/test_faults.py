"""Issue 5 faults: broken adapter files, failing steps, OOM on load, unregister in flight,
SIGTERM draining, and RPC registrations surviving a restart."""

from __future__ import annotations

import shutil
import signal
import threading
import time

import grpc
import pytest

from loramux.client import Client
from loramux.pb.loramux.v1 import loramux_pb2 as pb
from tests.server import ServerProcess, wait_for

S = grpc.StatusCode
FAULTS = "step:BOOM,crash:CRASH,join:NOROOM,admit:NOADMIT,load-oom:oom-once:1,load-oom:oom-always:9"


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store):
    work = tmp_path_factory.mktemp("faults")
    for name, src in (("fragile", "r4-qv"), ("steady", "r16-all"), ("oom-once", "r8-rs"),
                      ("oom-always", "r32-kv"), ("leaving", "r64-mlp")):
        shutil.copytree(adapter_store[src], work / "adapters" / name)
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--host-cache-bytes", "0",
                        "--adapter-scan-interval", "0", "--max-active-adapters", "2", "--max-batch-size", "4",
                        env={"LORAMUX_FAULTS": FAULTS})
    srv.work = work
    yield srv
    srv.stop()


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as err:
        return err.code(), err.details()
    return S.OK, ""


def test_adapter_files_broken_after_registration(server, reference):
    weights = server.work / "adapters" / "fragile" / "adapter_model.safetensors"
    good = weights.read_bytes()
    with server.client() as c:
        expected = reference.generate("r4-qv", "Hello world", 8)
        assert list(c.generate("Hello world", "fragile", max_new_tokens=8).token_ids) == expected
        c.generate("Hello", "steady", max_new_tokens=2)
        c.generate("Hello", "oom-once", max_new_tokens=2)  # push "fragile" out of both slots
        weights.write_bytes(good[: len(good) // 3])  # corrupted in place
        code, details = status_of(c.generate, "Hello world", "fragile", max_new_tokens=8)
        assert code == S.FAILED_PRECONDITION and "fragile" in details and "register" in details
        assert c.generate("Hello", "steady", max_new_tokens=4).generated_tokens >= 1  # others untouched
        weights.unlink()  # deleted
        code, details = status_of(c.generate, "Hello world", "fragile", max_new_tokens=8)
        assert code == S.FAILED_PRECONDITION and "missing" in details
        weights.write_bytes(good)  # repaired: served again without re-registering
        assert list(c.generate("Hello world", "fragile", max_new_tokens=8).token_ids) == expected


def test_failing_step_fails_only_its_requests(server, reference):
    with server.client() as c:
        results = {}

        def run(name, prompt):
            results[name] = status_of(c.generate, prompt, "steady", max_new_tokens=40)

        long = threading.Thread(target=run, args=("long", "Once upon a time"))
        long.start()
        time.sleep(0.3)  # "long" is decoding when the faulty prefill runs
        code, details = status_of(c.generate, "a BOOM here", "steady", max_new_tokens=4)
        long.join()
        assert code == S.INTERNAL and "injected fault" in details and "Traceback" not in details
        assert results["long"][0] == S.OK
        answer = c.generate("Hello world", "steady", max_new_tokens=8)
        assert list(answer.token_ids) == reference.generate("r16-all", "Hello world", 8)


def test_engine_crash_ends_running_requests_and_the_engine_goes_on(server, reference):
    """A failure outside the step's own handling (a bug) must not leave clients hanging on a
    batch that no longer matches its rows: running requests end INTERNAL, later ones work."""
    with server.client(timeout=30) as c:
        code, details = status_of(c.generate, "a CRASH here", "steady", max_new_tokens=4)
        assert code == S.INTERNAL and "injected engine crash" in details and "Traceback" not in details
        for _ in range(2):
            answer = c.generate("Hello world", "steady", max_new_tokens=8)
            assert list(answer.token_ids) == reference.generate("r16-all", "Hello world", 8)


def _fails_at_once_beside_a_long_request(server, reference, prompt: str, detail: str) -> None:
    """`prompt` ends INTERNAL (with `detail`) within seconds while another request decodes;
    that request's answer is PEFT's and nothing is left running."""
    with server.client(timeout=30) as c, Client(server.address, timeout=30) as other:
        results = {}

        def run():
            results["long"] = c.generate("Once upon a time", "steady", max_new_tokens=40)

        long = threading.Thread(target=run)
        long.start()
        assert wait_for(lambda: server.metrics()["loramux_running_requests"] >= 1, timeout=20)
        started = time.monotonic()
        code, details = status_of(other.generate, prompt, "steady", max_new_tokens=4)
        assert code == S.INTERNAL and detail in details and "Traceback" not in details
        assert time.monotonic() - started < 10
        long.join()
        assert list(results["long"].token_ids) == reference.generate("r16-all", "Once upon a time", 40)
        assert wait_for(lambda: server.metrics()["loramux_running_requests"] == 0, timeout=10)


def test_rows_that_cannot_join_the_batch_end_at_once(server, reference):
    """Prefilled rows whose join to the batch fails end INTERNAL at once (they were taken
    off the prefilled queue: without an error they would wait for their deadline), and the
    rows running beside them go on."""
    _fails_at_once_beside_a_long_request(server, reference, "NOROOM please", "joining the batch")


def test_a_request_that_fails_admission_ends_at_once_and_alone(server, reference):
    """A failure between the queue and the prefill (a bug) ends that request INTERNAL at once,
    not at its deadline, and neither the request decoding beside it nor a later one notices."""
    _fails_at_once_beside_a_long_request(server, reference, "NOADMIT please", "admission failed")
    with server.client(timeout=30) as c:
        answer = c.generate("Hello world", "steady", max_new_tokens=8)
    assert list(answer.token_ids) == reference.generate("r16-all", "Hello world", 8)


def test_out_of_memory_on_load(server, reference):
    with server.client() as c:
        answer = c.generate("Hello world", "oom-once", max_new_tokens=8)  # first try OOMs, retry works
        assert list(answer.token_ids) == reference.generate("r8-rs", "Hello world", 8)
        code, details = status_of(c.generate, "Hello world", "oom-always", max_new_tokens=8)
        assert code == S.RESOURCE_EXHAUSTED and "out of memory" in details
        assert c.generate("Hello", "steady", max_new_tokens=4).generated_tokens >= 1


def test_unregister_with_requests_in_flight(server, reference):
    with server.client() as c:
        expected = reference.generate("r64-mlp", "Once upon a time", 60)
        stream = c.stream("Once upon a time", "leaving", max_new_tokens=60)
        first = next(stream)
        c.unregister("leaving")
        tokens = list(first.token_ids) + [t for m in stream for t in m.token_ids]
        assert tokens == expected  # the running request finished on the adapter it started with
        assert status_of(c.generate, "Hi", "leaving")[0] == S.NOT_FOUND
        assert server.metrics()["loramux_adapters_active"] <= 2


def test_rpc_registrations_survive_restart(tmp_path, adapter_store):
    args = ("--adapter-dir", str(tmp_path / "adapters"), "--allow-adapter-root", str(adapter_store["r4-qv"].parent))
    srv = ServerProcess(tmp_path, *args)
    with srv.client() as c:
        c.register("kept", str(adapter_store["r4-qv"]))
        c.register("dropped", str(adapter_store["r8-rs"]))
        c.unregister("dropped")
        before = c.generate("Hello", "kept", max_new_tokens=8).token_ids
    assert srv.stop() == 0
    assert (tmp_path / "adapters" / ".loramux-registry.json").exists()
    srv = ServerProcess(tmp_path, *args)
    try:
        with srv.client() as c:
            assert [(a.adapter_id, a.source) for a in c.list()] == [("kept", "rpc")]
            assert c.generate("Hello", "kept", max_new_tokens=8).token_ids == before
    finally:
        srv.stop()


def test_sigterm_drains(tmp_path):
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--drain-timeout", "60")
    with srv.client() as c:
        stream = c.stream("Once upon a time", max_new_tokens=200)
        first = next(stream)
        srv.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 10
        while srv.health() != 2 and time.monotonic() < end:  # 2: NOT_SERVING
            time.sleep(0.05)
        assert srv.health() == 2
        code, details = status_of(c.generate, "Hello", max_new_tokens=4)
        assert code == S.UNAVAILABLE and "shutting down" in details
        rest = list(stream)
        assert rest[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) >= 1
    srv.proc.wait(60)
    assert srv.stop() == 0


def test_expired_requests_never_reach_the_device(server):
    with server.client() as c:
        # All 4 rows, held well past the 3 x 0.3 s below (ignore_eos: a random adapter may stop early).
        busy = [c.stream("Once upon a time", "steady", max_new_tokens=600, ignore_eos=True) for _ in range(4)]
        for s in busy:
            next(s)
        admitted_before = server.metrics()["loramux_queue_wait_seconds_count"]
        with Client(server.address, timeout=0.3) as hurried:
            codes = [status_of(hurried.generate, "Hello", "steady", max_new_tokens=4)[0] for _ in range(3)]
        assert codes == [S.DEADLINE_EXCEEDED] * 3
        for s in busy:
            s.cancel()
        time.sleep(1.0)
        # Admission (and so the device) never saw them: only the 4 busy rows were admitted meanwhile.
        assert server.metrics()["loramux_queue_wait_seconds_count"] == admitted_before
        assert server.metrics()["loramux_queue_depth"] == 0


def test_a_long_prompt_cancelled_between_pieces_frees_its_row(tmp_path):
    """A prompt prefilled in pieces whose deadline passes between two pieces ends with
    DEADLINE_EXCEEDED and gives its row back: with one row, the next request must run."""
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--max-prefill-tokens", "4",
                        "--max-batch-size", "1")
    try:
        long_prompt = "Once upon a time, in a land far away, " * 8  # ~300 tokens: ~75 pieces of 4
        with Client(srv.address, timeout=0.2) as hurried:
            assert status_of(hurried.generate, long_prompt, max_new_tokens=4)[0] == S.DEADLINE_EXCEEDED
        with srv.client(timeout=30) as c:
            assert c.generate("Hello", max_new_tokens=5, ignore_eos=True).generated_tokens == 5
        # The gauge is set after the step that ended the request, maybe after the answer arrived.
        assert wait_for(lambda: srv.metrics()["loramux_running_requests"] == 0, timeout=10)
    finally:
        srv.stop()
