"""Issue 6 scale-out: Ray Serve with 2 replicas routes by adapter (multiplexing) and gives
the single server's answers."""

from __future__ import annotations

import shutil
import time
from collections import defaultdict

import pytest

from tests.server import ServerProcess

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

ADAPTERS = ["r4-qv", "r16-all", "r8-rs", "r32-kv"]
PROMPTS = ["Hello world", "Once upon a time", "1 2 3 4"]


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, adapter_store):
    root = tmp_path_factory.mktemp("ray") / "adapters"
    for name in ADAPTERS:
        shutil.copytree(adapter_store[name], root / name)
    return root


@pytest.fixture(scope="module")
def handle(adapter_dir, base_path):
    from loramux.ray_serve import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(proxy_location="Disabled")
    app = build_app({"num_replicas": 2, "model": str(base_path), "adapter_dir": str(adapter_dir),
                     "max_active_adapters": 2, "max_lora_rank": 64, "metrics_port": -1, "torch_threads": 1,
                     "ray_actor_options": {"num_cpus": 1}})
    yield serve.run(app, name="loramux", route_prefix=None)
    serve.shutdown()
    ray.shutdown()


def ask(handle, adapter_id: str, prompt: str) -> dict:
    return handle.options(multiplexed_model_id=adapter_id).generate.remote(prompt, max_new_tokens=10).result()


def test_routing_and_answers(handle, adapter_dir, tmp_path):
    # Same adapter again and again: it sticks to the replica that loaded it (once the
    # replica has reported its adapters to the router: pushed every 0.1 s).
    first = ask(handle, "r4-qv", "Hello world")
    time.sleep(1.5)
    same = {ask(handle, "r4-qv", p)["replica"] for p in PROMPTS * 3}
    assert same == {first["replica"]}

    # Different adapters (more than one replica's 2 slots): spread across both replicas,
    # and each keeps going where it was loaded.
    where = defaultdict(set)
    answers = {}
    for adapter_id in ADAPTERS[1:]:
        where[adapter_id].add(ask(handle, adapter_id, PROMPTS[0])["replica"])
        time.sleep(1.5)
    for _ in range(3):
        for adapter_id in ADAPTERS:
            for prompt in PROMPTS:
                out = ask(handle, adapter_id, prompt)
                where[adapter_id].add(out["replica"])
                answers[adapter_id, prompt] = out["token_ids"]
    print("\nray routing:", {a: sorted(r) for a, r in where.items()})
    replicas = set().union(*where.values())
    assert len(replicas) == 2, dict(where)
    assert sum(len(r) == 1 for r in where.values()) >= 3, dict(where)  # mostly sticky

    # Every answer equals what a single loramux server gives.
    srv = ServerProcess(tmp_path, "--adapter-dir", str(adapter_dir))
    try:
        with srv.client() as c:
            for (adapter_id, prompt), tokens in answers.items():
                assert tokens == list(c.generate(prompt, adapter_id, max_new_tokens=10).token_ids)
    finally:
        srv.stop()
