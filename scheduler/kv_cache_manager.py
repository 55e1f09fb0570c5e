"""KVCacheManager: which blocks each request holds, and prefix-cache lookups.

A request's blocks cover its tokens in order; block ``i`` holds positions
``i * block_size ... (i + 1) * block_size - 1``::

    tokens:           [ 0 .. 15 | 16 .. 31 | 32 .. 47 | 48 .. 52       ]
    request.blocks:     b7        b2         b9         b4 (partly full)
                        <-- prefix hits --><-- allocated for this step -->

State transitions, called by the scheduler:

    get_computed_blocks(request)      look up the longest cached prefix (no state change)
    allocate_slots(request, n, ...)   take the hits, add blocks for n more tokens, register
                                      the blocks that become full in the prefix cache
    free(request)                     give every block back (finish, abort, preemption)

Full blocks are registered when they are allocated for the step that computes them, so a
request scheduled later in the same step can hit them (the runner writes every new token's
K/V of the batch before attention reads the cache).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from caldera.scheduler.block_pool import (
    ROOT_HASH,
    BlockHash,
    BlockPool,
    KVCacheBlock,
    hash_block_tokens,
)
from caldera.scheduler.output import ImageFeature
from caldera.scheduler.request import Request


@dataclass
class PrefixCacheStats:
    """Prompt tokens looked up in the prefix cache and how many were found (cumulative)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    def __init__(
        self, num_gpu_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_gpu_blocks)
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """The cached blocks of the longest prefix of the request's tokens, and the number of
        tokens they hold. The last token is never a hit, so at least one token is computed
        and a token can be sampled."""
        if not self.enable_prefix_caching:
            return [], 0
        if getattr(request.sampling_params, "prompt_logprobs", None) is not None:
            return [], 0  # every prompt position must be computed to report its logprob
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._block_hashes(request, max_hit_blocks)
        get_cached_block = self.block_pool.get_cached_block
        blocks: list[KVCacheBlock] = []
        for block_hash in hashes[:max_hit_blocks]:
            block = get_cached_block(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks, len(blocks) * self.block_size

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_new_computed_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Makes room for ``num_new_tokens`` more tokens after the computed ones (including
        the prefix hits ``new_computed_blocks``). Returns the newly allocated blocks (hits not
        included), or None, changing nothing, when too few blocks are free."""
        block_size = self.block_size
        num_total = request.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        if not new_computed_blocks and num_total <= len(request.blocks) * block_size:
            # The common decode step: the last block still has room.
            if self.enable_prefix_caching and num_total // block_size > request.num_cached_blocks:
                self._cache_full_blocks(request, num_total // block_size)
            return []
        num_held = len(request.blocks) + len(new_computed_blocks)
        num_new_blocks = -(-num_total // block_size) - num_held
        num_evictable_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_evictable_hits:
            return None
        if not request.blocks:
            self._record_lookup(request, num_new_computed_tokens)
        if new_computed_blocks:
            self.block_pool.touch(new_computed_blocks)
            request.blocks.extend(new_computed_blocks)
            request.num_cached_blocks = len(request.blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        request.blocks.extend(new_blocks)
        if self.enable_prefix_caching and num_total // block_size > request.num_cached_blocks:
            self._cache_full_blocks(request, num_total // block_size)
        return new_blocks

    def free(self, request: Request) -> None:
        """Gives back every block of the request, tail first, so that when the request's
        cached blocks are evicted its prefix, most likely to be shared, goes last."""
        self.block_pool.free_blocks(reversed(request.blocks))
        request.blocks = []
        request.num_cached_blocks = 0

    def get_block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in request.blocks]

    def reset_prefix_cache(self) -> bool:
        return self.block_pool.reset_prefix_cache()

    def _record_lookup(self, request: Request, num_hit_tokens: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += num_hit_tokens

    def _cache_full_blocks(self, request: Request, num_full_blocks: int) -> None:
        """Registers blocks ``num_cached_blocks .. num_full_blocks - 1`` in the prefix cache."""
        hashes = self._block_hashes(request, num_full_blocks)
        cache_block = self.block_pool.cache_block
        blocks = request.blocks
        for i in range(request.num_cached_blocks, num_full_blocks):
            cache_block(blocks[i], hashes[i])
        request.num_cached_blocks = num_full_blocks

    def _block_hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The request's block hashes, extended to at least ``num_blocks`` full blocks. Each
        block is hashed once, when first needed; tokens never change, so hashes stay valid
        across preemption."""
        hashes = request.block_hashes
        if len(hashes) >= num_blocks:
            return hashes
        block_size = self.block_size
        tokens = request.all_token_ids
        images = request.images
        parent = hashes[-1] if hashes else ROOT_HASH
        for i in range(len(hashes), num_blocks):
            start = i * block_size
            end = start + block_size
            keys = _image_identifiers(images, start, end) if images else ()
            parent = hash_block_tokens(parent, tokens[start:end], keys)
            hashes.append(parent)
        return hashes


def _image_identifiers(images: list[ImageFeature], start: int, end: int) -> list[str]:
    """Identifiers of the images whose placeholders overlap positions [start, end)."""
    return [image.identifier for image in images if image.offset < end and image.end > start]
