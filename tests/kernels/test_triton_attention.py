"""Triton paged attention (both variants) against the torch reference on random ragged
batches: decodes, fresh prefills and prefill chunks after cached prefixes in one launch,
shuffled block tables, partial last blocks, GQA, every dtype / head size / block size."""

from __future__ import annotations

import random
import zlib

import pytest
import torch

from caldera.kernels import triton_attention
from caldera.kernels.metadata import AttentionMetadata

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [(2, 2), (8, 2), (8, 1)]  # (query heads, KV heads): ratios 1, 4, 8
SHAPES = [(64, 16), (128, 32), (128, 16), (64, 32)]  # (head size, block size)


def _run(variant, batch, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.query, float("nan"))
    returned = variant(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.metadata,
        batch.scale,
        out=out,
        **kwargs,
    )
    assert returned is out
    return out


def _check(out: torch.Tensor, batch, atol: float) -> None:
    expected = batch.reference().float()
    got = out.float().cpu()
    assert not got.isnan().any(), "some output rows were never written"
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-b{s[1]}")
def test_mixed_batch_matches_reference(device, kit, dtype, heads, shape):
    head_size, block_size = shape
    rng = random.Random(zlib.crc32(repr((dtype, heads, shape)).encode()))
    query_lens, context_lens = kit.mixed_lengths(rng, block_size)
    batch = kit.build_batch(
        query_lens,
        context_lens,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_size=head_size,
        block_size=block_size,
        dtype=dtype,
        device=device,
        seed=rng.randint(0, 1000),
    )
    _check(_run(triton_attention.paged_attention, batch), batch, kit.atol[dtype])


@pytest.mark.parametrize(
    ("dtype", "heads"),
    list(zip(DTYPES, GQA)),
    ids=lambda p: str(p) if isinstance(p, torch.dtype) else f"gqa{p[0] // p[1]}",
)
def test_split_variant_matches_reference(device, kit, dtype, heads):
    rng = random.Random(7)
    query_lens, context_lens = kit.mixed_lengths(rng, 16)
    batch = kit.build_batch(
        query_lens,
        context_lens,
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_size=64,
        block_size=16,
        dtype=dtype,
        device=device,
        seed=3,
    )
    out = _run(triton_attention.paged_attention_split, batch, num_splits=4)
    _check(out, batch, kit.atol[dtype])


@pytest.mark.parametrize("num_splits", [2, 8])
def test_split_variant_long_decodes(device, kit, num_splits):
    # Splits of unequal use: one context fills all, others leave splits empty.
    batch = kit.build_batch(
        [1, 1, 1],
        [300, 17, 0],
        num_heads=8,
        num_kv_heads=2,
        head_size=128,
        block_size=32,
        dtype=torch.float16,
        device=device,
        seed=5,
    )
    out = _run(triton_attention.paged_attention_split, batch, num_splits=num_splits)
    _check(out, batch, kit.atol[torch.float16])


def test_long_prefill_spans_many_tiles(device, kit):
    # 70 new tokens with one query head per KV head: more than one 64-row tile.
    batch = kit.build_batch(
        [70, 1],
        [20, 40],
        num_heads=2,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        seed=11,
    )
    _check(_run(triton_attention.paged_attention, batch), batch, kit.atol[torch.float32])


@pytest.mark.parametrize("variant", ["single", "split"])
def test_sliding_window(device, kit, variant):
    batch = kit.build_batch(
        [1, 20, 1],
        [50, 30, 5],
        num_heads=4,
        num_kv_heads=1,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        seed=13,
        sliding_window=24,
    )
    if variant == "single":
        out = _run(triton_attention.paged_attention, batch)
    else:
        out = _run(triton_attention.paged_attention_split, batch, num_splits=2)
    _check(out, batch, kit.atol[torch.float32])


def test_rows_past_the_batch_are_left_alone(device, kit):
    # A query padded beyond the batch's tokens (as a graph-captured step might be).
    batch = kit.build_batch(
        [3, 1],
        [5, 9],
        num_heads=2,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=device,
        seed=17,
    )
    padded = torch.cat([batch.query, torch.zeros_like(batch.query[:2])])
    out = torch.full_like(padded, float("nan"))
    triton_attention.paged_attention(
        padded, batch.key_cache, batch.value_cache, batch.metadata, batch.scale, out=out
    )
    assert out[4:].isnan().all()
    torch.testing.assert_close(out[:4].cpu(), batch.reference(), atol=2e-5, rtol=0)


def test_wrapper_rejects_mismatched_heads(device):
    query = torch.zeros(1, 6, 64, device=device)
    cache = torch.zeros(2, 16, 4, 64, device=device)
    metadata = AttentionMetadata.build([1], [1], [[0]], 16, device=device)
    with pytest.raises(AssertionError, match="not a multiple"):
        triton_attention.paged_attention(query, cache, cache, metadata, 1.0)


def test_num_splits_only_for_long_decode_batches():
    decode = AttentionMetadata.build([1, 1], [4096, 100], [[0] * 256, [0] * 7], 16)
    assert triton_attention.num_splits_for(decode, num_kv_heads=8, num_sms=132) == 8
    short = AttentionMetadata.build([1, 1], [300, 100], [[0] * 19, [0] * 7], 16)
    assert triton_attention.num_splits_for(short, num_kv_heads=8, num_sms=132) == 1
    mixed = AttentionMetadata.build([5, 1], [4096, 100], [[0] * 256, [0] * 7], 16)
    assert triton_attention.num_splits_for(mixed, num_kv_heads=8, num_sms=132) == 1
    busy = AttentionMetadata.build([1] * 64, [4096] * 64, [[0] * 256] * 64, 16)
    assert triton_attention.num_splits_for(busy, num_kv_heads=8, num_sms=132) == 1


def test_supports_names_what_the_kernels_take():
    query = torch.zeros(1, 4, 128, dtype=torch.float16)
    cache = torch.zeros(2, 16, 2, 128, dtype=torch.float16)
    assert triton_attention.supports(query, cache)
    assert not triton_attention.supports(torch.zeros(1, 4, 80, dtype=torch.float16), cache)
    assert not triton_attention.supports(query, torch.zeros(2, 8, 2, 128, dtype=torch.float16))
    assert not triton_attention.supports(query, cache.float())
