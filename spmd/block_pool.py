"""Paged KV block allocation with reference counts and a prefix cache.

A block is identified in the prefix cache by a chained hash of the token ids it
holds: ``hash((parent_hash, tuple(block_tokens)))``, so equal hashes mean equal
prefixes (up to 64-bit collisions). A freed block keeps its hash and stays
reusable until its id is handed out again; free blocks are evicted in LRU order,
blocks that carry no hash first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

NO_PARENT_HASH = 0  # parent of a request's first block


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """Chained prefix-cache hash of one full block."""
    return hash((parent_hash, tuple(token_ids)))


class Block:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.block_id}, ref_cnt={self.ref_cnt}, block_hash={self.block_hash})"


class BlockPool:
    """Owns ``num_blocks`` KV blocks of ``block_size`` tokens each."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Unreferenced block ids, eviction order first (an ordered set).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``allocate`` can hand out, cached-but-unreferenced ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Hands out ``num_blocks`` unreferenced blocks (ref count 1), evicting cached ones."""
        assert num_blocks <= len(self._free), f"allocate({num_blocks}) with {len(self._free)} free"
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            assert block.ref_cnt == 0
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference to each block; unreferenced ones become free."""
        # Reversed, so that a request's tail blocks (least likely shared) are evicted first.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"double free of block {block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)

    def touch(self, block_ids: Sequence[int]) -> None:
        """Adds one reference to each (prefix-cache hit) block, taking free ones off the free list."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self._free[block_id]
            block.ref_cnt += 1

    def num_unreferenced(self, block_ids: Sequence[int]) -> int:
        """How many of these blocks ``touch`` would take off the free list."""
        return sum(1 for block_id in block_ids if self.blocks[block_id].ref_cnt == 0)

    def find_cached_blocks(self, block_hashes: Sequence[int]) -> list[int]:
        """Block ids of the longest prefix of ``block_hashes`` held in the cache."""
        if not self.enable_prefix_caching:
            return []
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Registers a block that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        assert block.ref_cnt > 0 and block.block_hash is None, block
        # Another request computed the same content concurrently: keep the first copy.
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            block.block_hash = block_hash

    def reset_prefix_cache(self) -> None:
        """Forgets every cached block; blocks in use stay allocated but unshareable."""
        for block_id in self._cached.values():
            self.blocks[block_id].block_hash = None
        self._cached.clear()

    def _evict(self, block: Block) -> None:
        del self._cached[block.block_hash]
        block.block_hash = None
