"""Ref-counted KV blocks, their free queue, and the prefix-cache index over full blocks.

Every block is usable: there is no reserved null block (a runner pads block tables with any
id; padded entries lie past ``seq_lens`` and are never read).

A block is in exactly one of three states::

    in use      ref_cnt > 0, not in the free queue, hashed or not
    cached      ref_cnt == 0, in the free queue, hashed: a prefix hit takes it back out
    free        ref_cnt == 0, in the free queue, not hashed

    free queue (LRU):  front [ evicted first ... most recently freed ] back
                         ^ get_new_blocks pops here; a popped cached block loses its hash

A full block's hash chains its parent's hash, its token ids and the identifiers of the
images whose placeholders overlap it, with SHA-256, so hashes are stable across processes::

    block:   0            1            2
    tokens:  [t0 .. t15]  [t16 .. t31] [t32 .. t47]
    hash:    h0 = H(root, t0..t15, imgs0)
                          h1 = H(h0, t16..t31, imgs1)
                                       h2 = H(h1, t32..t47, imgs2)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

BlockHash = bytes

# Parent of block 0: a fixed value, so every hash input has the same layout.
ROOT_HASH: BlockHash = bytes(32)


def hash_block_tokens(
    parent_hash: BlockHash, token_ids: Sequence[int], extra_keys: Sequence[str] = ()
) -> BlockHash:
    """SHA-256 of (parent hash, token ids, image identifiers) for one full block."""
    hasher = hashlib.sha256(parent_hash)
    hasher.update(array("q", token_ids).tobytes())
    for key in extra_keys:
        encoded = key.encode()
        hasher.update(len(encoded).to_bytes(4, "little"))
        hasher.update(encoded)
    return hasher.digest()


class KVCacheBlock:
    """One block of ``block_size`` token slots in every layer's KV cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None

    def __repr__(self) -> str:
        cached = "" if self.block_hash is None else ", hashed"
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt}{cached})"


class BlockPool:
    """All blocks, the LRU free queue (an OrderedDict: O(1) pop-front, remove, append), and
    the hash -> block index of the prefix cache (one block per hash)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks
        )
        self._cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no user: free ones and cached ones (evictable)."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request."""
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Takes ``num_blocks`` from the front of the free queue (evicting cached ones)."""
        if num_blocks > len(self._free):
            raise ValueError(f"cannot take {num_blocks} blocks, {len(self._free)} are free")
        popitem = self._free.popitem
        blocks = []
        for _ in range(num_blocks):
            block = popitem(last=False)[1]
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Adds a user to each block (prefix hits), taking unused ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drops a user from each block; unused ones join the back of the free queue in the
        given order (so the first given is evicted first)."""
        free = self._free
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.block_id] = block

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Registers a full block under its hash; False when another block already holds that
        hash (the same tokens computed twice), in which case this one stays unhashed."""
        if block.block_hash is not None:
            return block.block_hash == block_hash
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> bool:
        """Forgets every hash; refused (False) while any block is in use."""
        if len(self._free) != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        return True

    def free_block_ids(self) -> list[int]:
        """The free queue, front first (for tests and debugging)."""
        return list(self._free)

    def _evict(self, block: KVCacheBlock) -> None:
        if self._cached.get(block.block_hash) is block:
            del self._cached[block.block_hash]
        block.block_hash = None
