"""KV write (Triton): scatter this step's keys and values into their paged-cache slots.

Layouts (see ``caldera.kernels.metadata``)::

    key, value               [T, Hkv, D]      any float dtype; the last dim contiguous
    key_cache, value_cache   [N, B, Hkv, D]   B = block size; the last dim contiguous
    slot_mapping             [T] int64        block * B + row; a negative slot is skipped

    slot s  ->  key_cache[s // B, s % B, :, :]  <-  key[t, :, :]   (cast to the cache dtype)

One program per token copies all of its heads at once (a [Hkv, D] tile, padded to powers of
two and masked). Reference: ``caldera.kernels.reference.write_kv_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _copy_heads(
    src_ptr,  # *[Hkv, D] of one token
    dst_ptr,  # *[Hkv, D] of one cache slot
    stride_src_h,
    stride_dst_h,
    num_kv_heads,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_SIZE)
    tile = tl.load(src_ptr + offs_h[:, None] * stride_src_h + offs_d[None, :], mask=mask)
    tl.store(
        dst_ptr + offs_h[:, None] * stride_dst_h + offs_d[None, :],
        tile.to(dst_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _write_kv_kernel(
    key_ptr,  # *[T, Hkv, D]
    value_ptr,  # *[T, Hkv, D]
    key_cache_ptr,  # *[N, B, Hkv, D]
    value_cache_ptr,  # *[N, B, Hkv, D]
    slot_mapping_ptr,  # *[T] int64
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kc_n,
    stride_kc_b,
    stride_kc_h,
    stride_vc_n,
    stride_vc_b,
    stride_vc_h,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # ---- which slot this token goes to ---------------------------------------------------
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE

    # ---- copy keys, then values ----------------------------------------------------------
    _copy_heads(
        key_ptr + token * stride_kt,
        key_cache_ptr + block * stride_kc_n + row * stride_kc_b,
        stride_kh,
        stride_kc_h,
        num_kv_heads,
        HEAD_SIZE,
        BLOCK_H,
        BLOCK_D,
    )
    _copy_heads(
        value_ptr + token * stride_vt,
        value_cache_ptr + block * stride_vc_n + row * stride_vc_b,
        stride_vh,
        stride_vc_h,
        num_kv_heads,
        HEAD_SIZE,
        BLOCK_H,
        BLOCK_D,
    )


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64
) -> None:
    """Writes ``key``/``value`` row t into cache slot ``slot_mapping[t]`` (skipping negatives)."""
    assert key.dim() == 3 and key.shape == value.shape, (
        f"key and value must be [T, Hkv, D] and alike, got {tuple(key.shape)} and "
        f"{tuple(value.shape)}"
    )
    assert key_cache.dim() == 4 and key_cache.shape == value_cache.shape, (
        f"caches must be [N, B, Hkv, D] and alike, got {tuple(key_cache.shape)} and "
        f"{tuple(value_cache.shape)}"
    )
    assert key.shape[1:] == key_cache.shape[2:], (
        f"key heads/head size {tuple(key.shape[1:])} do not match the cache's "
        f"{tuple(key_cache.shape[2:])}"
    )
    assert slot_mapping.shape == (key.shape[0],) and slot_mapping.dtype == torch.int64, (
        f"slot_mapping must be int64 [{key.shape[0]}], got {slot_mapping.dtype} "
        f"{tuple(slot_mapping.shape)}"
    )
    for name, t in (
        ("key", key),
        ("value", value),
        ("key_cache", key_cache),
        ("value_cache", value_cache),
    ):
        assert t.stride(-1) == 1, f"{name} must be contiguous in its last dimension"
    assert key.device == key_cache.device == slot_mapping.device, "all tensors on one device"

    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        num_kv_heads,
        BLOCK_SIZE=key_cache.shape[1],
        HEAD_SIZE=head_size,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_size),
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1,
    )
