"""BlockPool: allocation, reference counts, prefix-cache lookup and LRU eviction."""

import pytest

from spmd.block_pool import NO_PARENT_HASH, BlockPool, hash_block_tokens


def chain_hashes(token_ids, block_size):
    hashes, parent = [], NO_PARENT_HASH
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size])
        hashes.append(parent)
    return hashes


def test_allocate_and_free_count_blocks():
    pool = BlockPool(8, 4)
    assert pool.num_free_blocks == 8 and pool.usage == 0.0
    ids = pool.allocate(3)
    assert len(set(ids)) == 3
    assert pool.num_free_blocks == 5 and pool.usage == pytest.approx(3 / 8)
    assert all(pool.blocks[i].ref_cnt == 1 for i in ids)
    more = pool.allocate(5)
    assert not set(ids) & set(more) and pool.num_free_blocks == 0
    pool.free(ids + more)
    assert pool.num_free_blocks == 8 and all(b.ref_cnt == 0 for b in pool.blocks)


def test_allocating_more_than_free_is_an_invariant_violation():
    pool = BlockPool(2, 4)
    with pytest.raises(AssertionError):
        pool.allocate(3)


def test_double_free_is_an_invariant_violation():
    pool = BlockPool(2, 4)
    ids = pool.allocate(1)
    pool.free(ids)
    with pytest.raises(AssertionError):
        pool.free(ids)


def test_chained_hash_depends_on_the_whole_prefix():
    a = chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chain_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[1] != b[1]  # same second block, different parents
    assert chain_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a


def test_cached_blocks_are_found_shared_and_freed_by_reference_count():
    pool = BlockPool(8, 4)
    hashes = chain_hashes(list(range(12)), 4)
    ids = pool.allocate(3)
    for block_id, block_hash in zip(ids, hashes):
        pool.cache_block(block_id, block_hash)
    assert pool.find_cached_blocks(hashes) == ids
    assert pool.find_cached_blocks(hashes[:2] + [12345]) == ids[:2]
    assert pool.find_cached_blocks(chain_hashes(list(range(1, 13)), 4)) == []

    pool.touch(ids[:2])  # a second request shares the first two blocks
    assert [pool.blocks[i].ref_cnt for i in ids] == [2, 2, 1]
    pool.free(ids)  # the first request finishes
    assert [pool.blocks[i].ref_cnt for i in ids] == [1, 1, 0]
    assert pool.num_free_blocks == 6
    assert ids[2] not in pool.allocate(5)  # the unhashed free blocks go first ...
    assert pool.allocate(1) == [ids[2]]  # ... then the cached one is evicted
    assert pool.find_cached_blocks(hashes) == ids[:2]


def test_free_cached_blocks_stay_findable_until_evicted_in_lru_order():
    pool = BlockPool(4, 2)
    old, new = chain_hashes([1, 1], 2), chain_hashes([2, 2], 2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, old[0])
    (b,) = pool.allocate(1)
    pool.cache_block(b, new[0])
    pool.free([a])
    pool.free([b])
    assert pool.num_free_blocks == 4
    assert pool.find_cached_blocks(old) == [a] and pool.find_cached_blocks(new) == [b]
    pool.touch([a])  # a hit takes a free cached block off the free list
    assert pool.num_free_blocks == 3 and pool.blocks[a].ref_cnt == 1
    pool.free([a])  # now a is the most recently used
    assert set(pool.allocate(2)).isdisjoint({a, b})
    assert pool.allocate(1) == [b]  # least recently freed cached block goes first
    assert pool.find_cached_blocks(new) == [] and pool.find_cached_blocks(old) == [a]


def test_duplicate_content_keeps_the_first_cached_copy():
    pool = BlockPool(4, 2)
    (block_hash,) = chain_hashes([3, 4], 2)
    a, b = pool.allocate(2)
    pool.cache_block(a, block_hash)
    pool.cache_block(b, block_hash)
    assert pool.find_cached_blocks([block_hash]) == [a]
    assert pool.blocks[b].block_hash is None


def test_reset_prefix_cache_forgets_every_block():
    pool = BlockPool(4, 2)
    hashes = chain_hashes([1, 2, 3, 4], 2)
    ids = pool.allocate(2)
    for block_id, block_hash in zip(ids, hashes):
        pool.cache_block(block_id, block_hash)
    pool.free(ids[1:])
    pool.reset_prefix_cache()
    assert pool.find_cached_blocks(hashes) == []
    assert all(b.block_hash is None for b in pool.blocks)
    assert pool.num_free_blocks == 3 and pool.blocks[ids[0]].ref_cnt == 1


def test_disabled_prefix_caching_never_hits():
    pool = BlockPool(4, 2, enable_prefix_caching=False)
    hashes = chain_hashes([1, 2], 2)
    (a,) = pool.allocate(1)
    pool.cache_block(a, hashes[0])
    assert pool.find_cached_blocks(hashes) == []
