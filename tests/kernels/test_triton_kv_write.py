"""Triton KV write against the torch reference: shuffled slots, skipped (negative) slots,
strided inputs (slices of a fused projection), every dtype, head size and block size."""

from __future__ import annotations

import pytest
import torch

from caldera.kernels import triton_kv_write
from caldera.kernels.reference import write_kv_reference


def _caches(num_blocks, block_size, num_kv_heads, head_size, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    poisoned = torch.full(shape, float("nan"), dtype=dtype, device=device)
    return poisoned, poisoned.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("num_kv_heads", "head_size", "block_size"), [(1, 64, 16), (3, 128, 32)])
def test_matches_reference(device, dtype, num_kv_heads, head_size, block_size):
    gen = torch.Generator().manual_seed(0)
    num_blocks, tokens = 6, 40
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1  # skipped tokens
    slots = slots.to(device)
    # keys and values as slices of one fused projection: token stride != Hkv * D
    fused = torch.randn(tokens, 3 * num_kv_heads * head_size, generator=gen).to(device, dtype)
    width = num_kv_heads * head_size
    key = fused[:, width : 2 * width].view(tokens, num_kv_heads, head_size)
    value = fused[:, 2 * width :].view(tokens, num_kv_heads, head_size)

    expected = _caches(num_blocks, block_size, num_kv_heads, head_size, dtype, device)
    write_kv_reference(key, value, *expected, slots)
    got = _caches(num_blocks, block_size, num_kv_heads, head_size, dtype, device)
    triton_kv_write.write_kv(key, value, *got, slots)

    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0, equal_nan=True)
    assert not expected[0].isnan().all()


def test_casts_to_the_cache_dtype(device):
    key = torch.randn(3, 2, 64, device=device)
    caches = _caches(2, 16, 2, 64, torch.float16, device)
    triton_kv_write.write_kv(key, -key, *caches, torch.tensor([5, 0, 31], device=device))
    torch.testing.assert_close(caches[0][0, 5], key[0].half(), atol=0, rtol=0)
    torch.testing.assert_close(caches[1][1, 15], -key[2].half(), atol=0, rtol=0)


def test_rejects_mismatched_heads(device):
    key = torch.zeros(2, 2, 64, device=device)
    cache = torch.zeros(4, 16, 4, 64, device=device)
    with pytest.raises(AssertionError, match="do not match"):
        triton_kv_write.write_kv(
            key, key, cache, cache, torch.zeros(2, dtype=torch.int64, device=device)
        )
