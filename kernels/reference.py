"""Torch references of the paged-attention ops: the ground truth the Triton kernels are tested
against, and the CPU path. Layouts are described in ``caldera.kernels.metadata``."""

from __future__ import annotations

import torch


def write_kv_reference(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; a negative slot means "do not write"
) -> None:
    """Scatters this step's keys and values into their cache slots."""
    num_blocks, block_size = key_cache.shape[:2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    key_cache.view(num_blocks * block_size, *key_cache.shape[2:])[slots] = key[valid].to(
        key_cache.dtype
    )
    value_cache.view(num_blocks * block_size, *value_cache.shape[2:])[slots] = value[valid].to(
        value_cache.dtype
    )


def gather_context(
    cache: torch.Tensor,  # [N, B, Hkv, D]
    block_table: torch.Tensor,  # [max_blocks] int32
    seq_len: int,
) -> torch.Tensor:  # [seq_len, Hkv, D]
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    # Whole-block rows from a 2-D view: a row copy, much faster than 4-D indexing.
    blocks = torch.index_select(cache.view(cache.shape[0], -1), 0, block_table[:num_blocks].long())
    return blocks.view(-1, *cache.shape[2:])[:seq_len]


def paged_attention_reference(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    query_start_loc: list[int],  # R + 1 entries
    seq_lens: list[int],  # R entries
    block_tables: torch.Tensor,  # [R, max_blocks] int32
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, H, D]
    """Attention of each request's new tokens over its whole cached context.

    New token i of a request with q_len new tokens and seq_len context sits at position
    ``seq_len - q_len + i`` and sees positions ``0 ..= that`` (causal inside the new chunk, full
    over the cached prefix); with a sliding window W only the last W positions up to it.
    Computed in float32, returned in the query's dtype.
    """
    num_heads = query.shape[1]
    num_kv_heads = key_cache.shape[2]
    out = torch.empty_like(query)
    for r, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[r], query_start_loc[r + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_context(key_cache, block_tables[r], seq_len).float()
        v = gather_context(value_cache, block_tables[r], seq_len).float()
        group = num_heads // num_kv_heads
        k = k.repeat_interleave(group, dim=1)  # [S, H, D]
        v = v.repeat_interleave(group, dim=1)
        q = query[start:end].float()  # [q, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        allowed = k_pos <= q_pos
        if sliding_window is not None:
            allowed &= k_pos > q_pos - sliding_window
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(query.dtype)
    return out
