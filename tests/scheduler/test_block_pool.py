"""Block pool and KV cache manager: ref counts, LRU eviction, hashing, allocation."""

from __future__ import annotations

import os
import subprocess
import sys

from caldera.scheduler import BlockPool, ImageFeature, KVCacheManager, Request, hash_block_tokens


def test_free_queue_is_lru_and_hits_leave_it():
    pool = BlockPool(4)
    a, b = pool.get_new_blocks(2)
    assert pool.free_block_ids() == [2, 3]
    assert pool.cache_block(a, b"h" * 32)
    pool.free_blocks([b, a])
    assert pool.free_block_ids() == [2, 3, 1, 0]
    assert pool.get_cached_block(b"h" * 32) is a
    pool.touch([a])  # a prefix hit on a freed, cached block
    assert a.ref_cnt == 1 and pool.free_block_ids() == [2, 3, 1]
    pool.free_blocks([a])
    taken = pool.get_new_blocks(4)  # evicts the cached block last
    assert [block.block_id for block in taken] == [2, 3, 1, 0]
    assert pool.get_cached_block(b"h" * 32) is None and a.block_hash is None


def test_a_hash_maps_to_one_block():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    assert pool.cache_block(a, b"x" * 32)
    assert not pool.cache_block(b, b"x" * 32)
    assert b.block_hash is None


def test_hash_depends_on_parent_tokens_and_images():
    root = bytes(32)
    base = hash_block_tokens(root, [1, 2, 3])
    assert base == hash_block_tokens(root, [1, 2, 3])
    assert base != hash_block_tokens(root, [1, 2, 4])
    assert base != hash_block_tokens(b"p" * 32, [1, 2, 3])
    assert base != hash_block_tokens(root, [1, 2, 3], ["img"])
    assert hash_block_tokens(root, [1], ["ab", "c"]) != hash_block_tokens(root, [1], ["a", "bc"])


def test_hash_is_stable_across_processes():
    code = (
        "from caldera.scheduler import hash_block_tokens;"
        "print(hash_block_tokens(bytes(32), [5, 6, 7], ['img']).hex())"
    )
    results = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert results == {hash_block_tokens(bytes(32), [5, 6, 7], ["img"]).hex()}


def _request(req_id: str, tokens: list[int], images=()) -> Request:
    return Request(req_id, tokens, images=list(images))


def test_allocate_hit_and_free():
    kv = KVCacheManager(num_gpu_blocks=8, block_size=4)
    first = _request("a", list(range(10)))
    assert kv.get_computed_blocks(first) == ([], 0)
    new = kv.allocate_slots(first, 10)
    assert [b.block_id for b in new] == [0, 1, 2]
    first.num_computed_tokens = 10
    second = _request("b", list(range(9)) + [99])
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8 and blocks == first.blocks[:2]
    kv.allocate_slots(second, 2, blocks, num_hit)
    assert [b.ref_cnt for b in first.blocks] == [2, 2, 1]
    kv.free(first)
    kv.free(second)
    assert kv.num_free_blocks == 8
    # Tail blocks are freed first, so they are evicted first.
    assert kv.block_pool.free_block_ids()[-2:] == [1, 0]


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_gpu_blocks=3, block_size=4)
    first = _request("a", list(range(8)))
    kv.allocate_slots(first, 8)
    first.num_computed_tokens = 8
    kv.free(first)  # both blocks cached and free
    second = _request("b", list(range(20)))
    blocks, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8
    assert kv.allocate_slots(second, 12, blocks, num_hit) is None
    assert second.blocks == [] and kv.num_free_blocks == 3
    assert kv.allocate_slots(second, 4, blocks, num_hit) is not None
    assert kv.num_free_blocks == 0


def test_image_identifiers_separate_equal_token_blocks():
    kv = KVCacheManager(num_gpu_blocks=16, block_size=4)
    tokens = [1, 2] + [32000] * 8 + [3, 4, 5]
    cat = _request("cat", tokens, [ImageFeature("cat", 2, 8)])
    kv.allocate_slots(cat, len(tokens))
    cat.num_computed_tokens = len(tokens)
    same = _request("same", tokens, [ImageFeature("cat", 2, 8)])
    other = _request("other", tokens, [ImageFeature("dog", 2, 8)])
    assert kv.get_computed_blocks(same)[1] == 12
    assert kv.get_computed_blocks(other)[1] == 0


def test_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_gpu_blocks=8, block_size=4)
    first = _request("a", list(range(8)))
    kv.allocate_slots(first, 8)
    assert kv.get_computed_blocks(_request("b", list(range(8))))[1] == 4
    assert kv.get_computed_blocks(_request("c", list(range(9))))[1] == 8
