"""Acceptance 1: mixed batches give PEFT's tokens, adapter by adapter, on the 4-bit base."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.server import ServerProcess

PROMPTS = ["Hello world", "The quick brown fox", "a", "Tell me a story about dragons and",
           "1 2 3 4", "Once upon a time, in a land far away,"]
IN_BATCH = ("", "r4-qv", "r16-all", "r64-mlp", "r8-rs")


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapter_store, base_path):
    work = tmp_path_factory.mktemp("parity")
    for name in ("r4-qv", "r16-all", "r64-mlp"):
        shutil.copytree(adapter_store[name], work / "adapters" / name)
    srv = ServerProcess(work, "--adapter-dir", str(work / "adapters"),
                        "--allow-adapter-root", str(adapter_store["r8-rs"].parent),
                        "--max-active-adapters", "4", "--max-batch-size", "16")
    yield srv
    srv.stop()


def test_mixed_batch_matches_peft(server, reference, adapter_store):
    with server.client() as client:
        client.register("r8-rs", str(adapter_store["r8-rs"]))  # one by RPC, three by folder
        jobs = [(IN_BATCH[i % len(IN_BATCH)], PROMPTS[i % len(PROMPTS)]) for i in range(30)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda j: client.generate(j[1], j[0], max_new_tokens=24), jobs))
    for (adapter_id, prompt), answer in zip(jobs, answers, strict=True):
        expected = reference.generate(adapter_id, prompt, 24)
        assert list(answer.token_ids) == expected, (adapter_id, prompt, answer.text)
        assert answer.adapter_id == adapter_id
        assert answer.generated_tokens == len(expected)
    # The oracle must be able to tell adapters apart, or the test proves nothing.
    outputs = {a: [reference.generate(a, p, 24) for p in PROMPTS] for a in IN_BATCH}
    assert len({tuple(map(tuple, o)) for o in outputs.values()}) == len(IN_BATCH)
    m = server.metrics()
    assert m["loramux_batch_adapters_sum"] / m["loramux_batch_adapters_count"] > 1.0  # mixed batches happened
    assert m["loramux_batch_size_sum"] / m["loramux_batch_size_count"] > 2.0


def test_prompts_computed_inside_decode_steps_match_peft(server, reference):
    """Requests that arrive while a row decodes have their prompts computed inside its decode
    steps (--mixed-steps on, the default): their answers and the running row's are PEFT's."""
    before = server.metrics().get("loramux_mixed_prompt_tokens_total", 0)
    jobs = [(a, p) for a, p in zip(("r4-qv", "", "r16-all", "r64-mlp"), PROMPTS, strict=False)]
    with server.client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        # ignore_eos: it decodes all 160 steps (a random adapter may stop early)
        stream = client.stream(PROMPTS[3], "r16-all", max_new_tokens=160, ignore_eos=True)
        running = [next(stream)]  # its first token: it decodes now
        late = [pool.submit(client.generate, p, a, max_new_tokens=12) for a, p in jobs]
        running += list(stream)
        answers = [f.result() for f in late]
    alone = reference.generate("r16-all", PROMPTS[3], 160)  # up to its first EOS
    assert [t for r in running for t in r.token_ids][:len(alone)] == alone
    for (adapter_id, prompt), answer in zip(jobs, answers, strict=True):
        assert list(answer.token_ids) == reference.generate(adapter_id, prompt, 12), (adapter_id, prompt)
    uncached = sum(a.prompt_tokens - a.cached_prompt_tokens for a in answers)  # the prefix cache has the rest
    assert server.metrics()["loramux_mixed_prompt_tokens_total"] - before >= uncached > 0


def test_long_prompts_in_pieces_match_peft_and_others_go_on(tmp_path, adapter_store, reference):
    """A prompt longer than --max-prefill-tokens is prefilled a piece per engine turn, with
    decode steps of the running rows between the pieces; its answer is still PEFT's."""
    shutil.copytree(adapter_store["r16-all"], tmp_path / "adapters" / "r16-all")
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--max-prefill-tokens", "16")
    long_prompt = "Once upon a time, in a land far away, there lived a dragon who"  # 64 tokens: 4 pieces
    try:
        with srv.client() as client, ThreadPoolExecutor(3) as pool:
            short = pool.submit(client.generate, "Hello world", "", max_new_tokens=40)
            jobs = [pool.submit(client.generate, long_prompt, a, max_new_tokens=12) for a in ("", "r16-all")]
            answers = [j.result() for j in jobs]
            assert list(short.result().token_ids) == reference.generate("", "Hello world", 40)
        for adapter_id, answer in zip(("", "r16-all"), answers, strict=True):
            assert answer.prompt_tokens > 16 * 3
            assert list(answer.token_ids) == reference.generate(adapter_id, long_prompt, 12), adapter_id
    finally:
        srv.stop()
