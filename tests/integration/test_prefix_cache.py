"""The per-adapter prefix cache: PEFT's answers with it on, never another adapter's keys."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.adapters import make_adapter
from tests.reference import PeftReference
from tests.server import ServerProcess

BLOCK = 16  # loramux.model.prefix.BLOCK; the tiny model's tokenizer is one token per byte
# Shared prefixes (a task's instructions) with different questions after them.
PREFIXES = ["You are a terse assistant. Answer in one short line, no preamble, no apologies.\n",
            "Translate the following into French, keeping names as they are written:\n"]
QUESTIONS = ["What is two and two?", "Name a colour.", "Why is the sky blue?", "Say hi"]
ADAPTERS = ("", "r4-qv", "r16-all", "r64-mlp", "r8-rs")


def _serve(tmp_path_factory, adapter_store, name: str, *args: str) -> ServerProcess:
    work = tmp_path_factory.mktemp(name)
    for a in ADAPTERS[1:]:
        shutil.copytree(adapter_store[a], work / "adapters" / a)
    return ServerProcess(work, "--adapter-dir", str(work / "adapters"), "--max-active-adapters", "4",
                         "--allow-adapter-root", str(adapter_store["r4-qv"].parent), "--max-batch-size", "16", *args)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, adapter_store):
    srv = _serve(tmp_path_factory, adapter_store, "prefix-on")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def uncached(tmp_path_factory, adapter_store):
    srv = _serve(tmp_path_factory, adapter_store, "prefix-off", "--prefix-cache-bytes", "0")
    yield srv
    srv.stop()


def _run(server: ServerProcess, jobs: list[tuple[str, str]], max_new_tokens: int = 12) -> list:
    with server.client() as client, ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(lambda j: client.generate(j[1], j[0], max_new_tokens=max_new_tokens), jobs))


def test_shared_prefixes_match_peft_with_the_cache_on_and_off(cached, uncached, reference):
    """Acceptance 1 and 4: adapters and the base share prefixes in concurrent batches."""
    jobs = [(a, p + q) for p in PREFIXES for q in QUESTIONS for a in ADAPTERS]
    before = cached.metrics()
    first = _run(cached, jobs[::3])  # warms the cache with a third of the requests
    on, off = _run(cached, jobs), _run(uncached, jobs)
    for (adapter_id, prompt), a, b in zip(jobs, on, off, strict=True):
        expected = reference.generate(adapter_id, prompt, 12)
        assert list(a.token_ids) == expected, (adapter_id, prompt)
        assert list(b.token_ids) == expected, (adapter_id, prompt)
        assert b.cached_prompt_tokens == 0
        # The warm-up prefilled the whole prefix for this adapter: its end, mid-block, is
        # served from the start of the block of another question after it.
        prefix = next(p for p in PREFIXES if prompt.startswith(p))
        assert len(prefix.encode()) <= a.cached_prompt_tokens < a.prompt_tokens, (adapter_id, prompt)
    assert all(r.cached_prompt_tokens < r.prompt_tokens for r in first)
    # In the warm-up burst, requests that share an adapter and a prefix computed it once:
    # the first prefilled, the others waited for it and took it from the cache.
    for adapter_id in ADAPTERS:
        for prefix in PREFIXES:
            hits = [r.cached_prompt_tokens > 0 for (a, p), r in zip(jobs[::3], first, strict=True)
                    if a == adapter_id and p.startswith(prefix)]
            assert sorted(hits) == [False] + [True] * (len(hits) - 1), (adapter_id, prefix, hits)
    m = cached.metrics()
    hit = m["loramux_prefix_cache_hit_tokens_total"] - before.get("loramux_prefix_cache_hit_tokens_total", 0)
    query = m["loramux_prefix_cache_query_tokens_total"] - before.get("loramux_prefix_cache_query_tokens_total", 0)
    assert hit == sum(r.cached_prompt_tokens for r in first + on)
    assert query == sum(r.prompt_tokens for r in first + on) and 0.5 < hit / query < 1
    assert m["loramux_prefix_cache_bytes"] > 0 and "loramux_prefix_cache_evictions_total" in m
    assert uncached.metrics()["loramux_prefix_cache_query_tokens_total"] == 0


def test_seeded_sampling_is_the_same_with_the_cache_on_and_off(cached, uncached):
    """Cached keys and values are the ones a whole prefill computes: sampled answers agree too."""
    prompt, params = PREFIXES[0] + "Tell me a story.", {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7}
    with cached.client() as on, uncached.client() as off:
        answers = [c.generate(prompt, "r16-all", max_new_tokens=16, **params) for c in (on, on, off)]
    assert answers[1].cached_prompt_tokens > 0
    assert list(answers[0].token_ids) == list(answers[1].token_ids) == list(answers[2].token_ids)


def test_adapters_sharing_a_prompt_each_get_their_own_answer(cached, reference):
    """Acceptance 2: the cache warm with one adapter's keys, the others still answer as themselves."""
    prompt = "Summarise the paragraph below in one sentence of plain words:\nThe cat sat on the mat."
    order = ["r16-all", "", "r4-qv", "r64-mlp", "r8-rs"]
    with cached.client() as client:
        answers = [client.generate(prompt, a, max_new_tokens=12) for a in order + order]
    for a, answer in zip(order + order, answers, strict=True):
        assert list(answer.token_ids) == reference.generate(a, prompt, 12), a
    assert [r.cached_prompt_tokens for r in answers[:5]] == [0] * 5  # nobody else's prefix
    assert all(r.cached_prompt_tokens > 0 for r in answers[5:])
    assert len({tuple(reference.generate(a, prompt, 12)) for a in order}) == len(order)


def test_an_id_registered_again_with_other_weights_answers_with_them(cached, adapter_store, reference):
    prompt = PREFIXES[0] + "Count to five."
    with cached.client() as client:
        client.register("again", str(adapter_store["r4-qv"]))
        old = [client.generate(prompt, "again", max_new_tokens=12) for _ in range(2)]
        client.unregister("again")
        client.register("again", str(adapter_store["r32-kv"]))
        new = client.generate(prompt, "again", max_new_tokens=12)
        client.unregister("again")
    assert old[1].cached_prompt_tokens > 0
    assert list(old[0].token_ids) == list(old[1].token_ids) == reference.generate("r4-qv", prompt, 12)
    assert new.cached_prompt_tokens == 0
    assert list(new.token_ids) == reference.generate("r32-kv", prompt, 12)


def test_a_folder_replaced_in_place_answers_with_its_new_weights(tmp_path, base_path):
    """Same id, same rank and targets, other values: only the weights tell them apart."""
    old = make_adapter(base_path, tmp_path / "src" / "old", rank=8, seed=11)
    new = make_adapter(base_path, tmp_path / "src" / "new", rank=8, seed=12)
    shutil.copytree(old, tmp_path / "adapters" / "swap")
    ref = PeftReference(base_path, {"old": old, "new": new})
    prompt = PREFIXES[1] + "Good morning, everyone."
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--adapter-scan-interval", "0.2")
    try:
        with srv.client() as client:
            before = [client.generate(prompt, "swap", max_new_tokens=12) for _ in range(2)]
            registered = srv.log().count("registered adapter 'swap'")
            for f in new.iterdir():
                if f.is_file():
                    shutil.copy(f, tmp_path / "adapters" / "swap" / f.name)
            end = time.monotonic() + 30
            while srv.log().count("registered adapter 'swap'") == registered and time.monotonic() < end:
                time.sleep(0.1)
            after = client.generate(prompt, "swap", max_new_tokens=12)
    finally:
        srv.stop()
    assert before[1].cached_prompt_tokens > 0
    assert list(before[1].token_ids) == ref.generate("old", prompt, 12)
    assert ref.generate("old", prompt, 12) != ref.generate("new", prompt, 12)
    assert list(after.token_ids) == ref.generate("new", prompt, 12)
    assert after.cached_prompt_tokens == 0


def test_the_cache_stays_within_its_bytes_and_long_prompts_in_pieces_use_it(tmp_path, adapter_store, reference):
    """Acceptance 3: a workload larger than --prefix-cache-bytes evicts, stays in bounds, answers right;
    a prompt prefilled in pieces (--max-prefill-tokens) starts after its cached prefix."""
    shutil.copytree(adapter_store["r16-all"], tmp_path / "adapters" / "r16-all")
    bound = 7 * BLOCK * (4 * 2 * 4 * 32 * 4)  # 7 blocks of the tiny model (4 layers, 4 kv heads x 32)
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--prefix-cache-bytes", str(bound),
                        "--max-prefill-tokens", "24")
    prompts = [f"{i}: " + PREFIXES[i % 2] for i in range(6)]  # 4-5 blocks each, none shared
    long = prompts[-1] + "And then a tail long enough to be prefilled in two pieces."
    try:
        with srv.client() as client:
            for round_ in range(2):
                for p in prompts:
                    for a in ("", "r16-all"):
                        answer = client.generate(p, a, max_new_tokens=8)
                        assert list(answer.token_ids) == reference.generate(a, p, 8), (round_, a, p)
                        assert srv.metrics()["loramux_prefix_cache_bytes"] <= bound
            again = client.generate(prompts[-1], "r16-all", max_new_tokens=8)
            pieces = client.generate(long, "r16-all", max_new_tokens=8)
        m = srv.metrics()
    finally:
        srv.stop()
    assert m["loramux_prefix_cache_evictions_total"] > 0
    assert again.cached_prompt_tokens == BLOCK * ((again.prompt_tokens - 1) // BLOCK)
    assert list(again.token_ids) == reference.generate("r16-all", prompts[-1], 8)
    assert pieces.cached_prompt_tokens == BLOCK * (again.prompt_tokens // BLOCK)
    assert pieces.prompt_tokens - pieces.cached_prompt_tokens > 2 * 24  # the rest went in pieces
    assert list(pieces.token_ids) == reference.generate("r16-all", long, 8)


def test_rows_parked_for_another_adapter_go_on_after_their_cached_prefixes(tmp_path, adapter_store, reference):
    """One slot, two adapters whose prompts start with prefixes both have cached: the long
    answer's rows are parked (KV kept) while the other adapter's request takes the slot, and
    go on; each answer equals its own alone (PEFT's for the short one)."""
    for name in ("r16-all", "r4-qv"):
        shutil.copytree(adapter_store[name], tmp_path / "adapters" / name)
    srv = ServerProcess(tmp_path, "--adapter-dir", str(tmp_path / "adapters"), "--max-active-adapters", "1",
                        "--max-slot-wait", "0.05", "--min-slot-turn", "0.2")
    long_prompt, short_prompt = PREFIXES[0] + QUESTIONS[0], PREFIXES[0] + QUESTIONS[1]
    try:
        with srv.client() as client:
            for a in ("r16-all", "r4-qv"):  # each adapter's prefix cached
                client.generate(PREFIXES[0] + QUESTIONS[3], a, max_new_tokens=2)
            long = client.stream(long_prompt, "r16-all", max_new_tokens=200, ignore_eos=True)
            long_tokens = list(next(long).token_ids)
            short = client.generate(short_prompt, "r4-qv", max_new_tokens=10)
            parks = srv.metrics()["loramux_adapter_preemptions_total"]
            for event in long:
                long_tokens += event.token_ids
            alone = client.generate(long_prompt, "r16-all", max_new_tokens=200, ignore_eos=True)
    finally:
        srv.stop()
    assert parks >= 1 and short.cached_prompt_tokens >= 4 * BLOCK and alone.cached_prompt_tokens >= 4 * BLOCK
    assert list(short.token_ids) == reference.generate("r4-qv", short_prompt, 10)
    assert len(long_tokens) == 200 and long_tokens == list(alone.token_ids)
