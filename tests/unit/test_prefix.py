"""PrefixCache: chains of blocks per namespace, LRU by bytes with leaves first, forget."""

from __future__ import annotations

import torch

from loramux.metrics import Metrics
from loramux.model.prefix import BLOCK, PrefixCache

LAYERS, HEADS, DIM = 2, 1, 4
BLOCK_BYTES = LAYERS * 2 * HEADS * BLOCK * DIM * 4


def kv_of(tokens: list[int]):
    """Keys and values that encode each token's id, so a wrong block shows."""
    t = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    full = t.expand(LAYERS, 2, HEADS, len(tokens), DIM).clone()
    return lambda start, end: full[:, :, :, start:end]


def put(cache: PrefixCache, namespace: str, tokens: list[int], owner: str = "a") -> None:
    cache.insert(namespace, owner, tokens, kv_of(tokens))


def served(cache: PrefixCache, namespace: str, tokens: list[int]) -> list[int]:
    kv = cache.lookup(namespace, tokens)
    return [] if kv is None else kv[0, 0, 0, :, 0].long().tolist()


def test_longest_prefix_in_its_namespace_only():
    cache = PrefixCache(1 << 20, Metrics())
    prompt = list(range(100, 150))  # 3 full blocks and 2 tokens
    put(cache, "w1", prompt)
    assert served(cache, "w1", prompt) == prompt[:48]
    assert served(cache, "w1", prompt[:40] + [7] * 20) == prompt[:40]  # diverges in block 3, 8 tokens in
    assert served(cache, "w1", [1] + prompt[1:]) == []  # diverges in block 1: nothing after it counts
    assert served(cache, "w2", prompt) == [] and served(cache, "base", prompt) == []
    assert served(cache, "w1", prompt[:48]) == prompt[:47]  # the last token is always prefilled
    assert cache.peek("w1", prompt) == 48 and cache.peek("w2", prompt) == 0


def test_bounded_by_bytes_evicting_leaves_first_and_peek_does_not_touch():
    metrics = Metrics()
    cache = PrefixCache(4 * BLOCK_BYTES, metrics)
    a, b = list(range(64)), list(range(1000, 1032))
    put(cache, "w", a[:48] + [0])  # 3 blocks of a
    put(cache, "w", b + [0])  # 2 of b: one of a's must go, its last (a leaf), not its first
    assert cache.nbytes <= 4 * BLOCK_BYTES
    assert served(cache, "w", a) == a[:32] and served(cache, "w", b + [0]) == b
    assert metrics.prefix_cache_evictions._value.get() == 1
    cache.peek("w", a)  # a peek keeps b the most recent: the next eviction takes a's leaf
    put(cache, "w", [5] * 17)
    assert served(cache, "w", a) == a[:16] and served(cache, "w", b + [0]) == b


def test_forget_drops_an_owner_s_namespaces():
    cache = PrefixCache(1 << 20, Metrics())
    prompt = list(range(40))
    put(cache, "w1", prompt, owner="x")
    put(cache, "w2", prompt, owner="y")
    cache.forget("x")
    assert served(cache, "w1", prompt) == [] and served(cache, "w2", prompt) == prompt[:32]
    assert cache.nbytes == 2 * BLOCK_BYTES


def test_a_block_larger_than_the_cache_is_not_kept():
    cache = PrefixCache(BLOCK_BYTES - 1, Metrics())
    put(cache, "w", list(range(40)))
    assert cache.nbytes == 0 and served(cache, "w", list(range(40))) == []


def test_a_block_s_start_is_served_from_the_sibling_sharing_the_most():
    cache = PrefixCache(1 << 20, Metrics())
    system = list(range(100, 137))  # 2 blocks and 5 tokens: a prompt that ends mid-block
    put(cache, "w", system + [1, 2, 3] + [9] * 20)
    put(cache, "w", system + [1, 2, 4] + [8] * 20)
    ask = system + [1, 2, 3, 5] + [6] * 10
    assert served(cache, "w", ask) == ask[:40]  # the first sibling shares 8 tokens of block 2
    assert cache.peek("w", ask) == 40
    assert served(cache, "w", system + [7] * 10) == system  # both share the 5
    assert served(cache, "w", system[:34]) == system[:33]  # never the last token
    assert served(cache, "w2", ask) == []  # parts are per namespace too
    assert served(cache, "w", [5] + system) == []  # the first token differs: nothing
    assert served(cache, "w", system[:10] + [5] * 10) == []  # a part alone, without a whole block: not served


def test_parts_follow_eviction_and_forget():
    metrics = Metrics()
    cache = PrefixCache(3 * BLOCK_BYTES, metrics)
    a = list(range(16)) + list(range(50, 66))
    put(cache, "w", a, owner="x")  # 2 blocks
    put(cache, "w", list(range(16)) + [7] * 16, owner="x")  # a sibling of a's block 1
    assert metrics.prefix_cache_evictions._value.get() == 0
    put(cache, "w", [3] * 32, owner="x")  # 2 more blocks: the two least recent (leaves) go
    assert served(cache, "w", list(range(16)) + [50, 51, 0]) == list(range(16))
    cache.forget("x")
    assert served(cache, "w", [3] * 20) == [] and cache.nbytes == 0


def test_lookups_name_the_whole_blocks_they_copied():
    """Two lookups of one prefix name the same blocks (their keys and values are the same
    numbers); a block made again after an eviction gets a new id; a block's part is not named."""
    cache = PrefixCache(3 * BLOCK_BYTES, Metrics())
    prompt = list(range(50))  # 3 full blocks and 2 tokens
    put(cache, "w", prompt)
    kv, blocks = cache.lookup_blocks("w", prompt[:36] + [99] * 14)
    assert len(blocks) == 2 and kv.shape[3] == 36  # 32 of whole blocks, then 4 of block 3's start
    assert cache.lookup_blocks("w", prompt[:40] + [1])[1] == blocks
    assert cache.lookup_blocks("w", prompt)[1][:2] == blocks
    assert cache.lookup_blocks("w", prompt[:20] + [7] * 30)[1] == blocks[:1]
    assert cache.lookup_blocks("w2", prompt) == (None, ())
    put(cache, "w", [5] * 49)  # pushes prompt's blocks out
    put(cache, "w", prompt)
    again = cache.lookup_blocks("w", prompt)[1]
    assert len(again) == 3 and not set(again) & set(blocks)


def test_evicted_and_forgotten_blocks_memory_is_reused_never_beyond_the_bound():
    cache = PrefixCache(6 * BLOCK_BYTES, Metrics())
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (3 * BLOCK + 1,), generator=rng).tolist() for _ in range(12)]
    for i, prompt in enumerate(prompts):  # 3 blocks each: every insert after the second evicts
        put(cache, f"w{i % 3}", prompt, owner=f"o{i % 3}")
        assert served(cache, f"w{i % 3}", prompt) == prompt[: 3 * BLOCK]  # a reused block holds the new tokens
        assert cache.nbytes <= 6 * BLOCK_BYTES
    assert cache._pool._made <= 6 + 1  # the bound's blocks and the one being inserted
    cache.forget("o2")  # prompt 11, still cached, gives its blocks back
    put(cache, "x", prompts[0], owner="o0")
    assert served(cache, "x", prompts[0]) == prompts[0][: 3 * BLOCK] and served(cache, "w2", prompts[11]) == []
    assert served(cache, "w1", prompts[10]) == prompts[10][: 3 * BLOCK]
    assert cache._pool._made <= 7
