"""Paged attention over the mixed batch (Triton): prefill chunks and decodes in one launch.

Layouts (see ``caldera.kernels.metadata``)::

    query            [T, H, D]        fp16 | bf16 | fp32; T = new tokens of all requests
    key/value_cache  [N, B, Hkv, D]   same dtype; B = block size (16 | 32); H = G * Hkv (GQA)
    block_tables     [R, max_blocks]  int32
    query_start_loc  [R + 1]          int32; request r owns rows qsl[r] : qsl[r + 1]
    seq_lens         [R]              int32; context after this step (cached prefix + new)
    out              [T, H, D]        query dtype

New token i of request r (q_len new tokens) sits at position p = seq_len - q_len + i and sees
positions 0 ..= p (causal in the chunk, full over the cached prefix); with a sliding window W,
only p - W < k <= p.

Work decomposition: a program owns one *tile* (BLOCK_Q consecutive new tokens of one request)
and one KV head. Its BLOCK_M rows are the tile's tokens times the G query heads that share
that KV head, so every K/V load serves the whole GQA group::

    row m  ->  token  first + m // G,  query head  kv_head * G + m % G   (m < BLOCK_Q * G)

    tile ids along the flattened token axis (BLOCK_Q = 4, T = 10, R = 3):
        request 0: qsl 0, q_len 3  starts at 0 // 4 + 0 = 0: tile 0
        request 1: qsl 3, q_len 6  starts at 3 // 4 + 1 = 1: tiles 1, 2 (tile 3 idle)
        request 2: qsl 9, q_len 1  starts at 9 // 4 + 2 = 4: tile 4
        grid: 10 // 4 + 3 = 5 tiles

Request r's tiles start at ``qsl[r] // BLOCK_Q + r``, an upper bound of the tiles before it,
so a program finds its request by binary search over ``query_start_loc`` and idle programs
return at once. The grid is ``T // BLOCK_Q + R`` tiles by Hkv heads.

The program walks its context in TILE_N-token tiles; token k lives at
``block_tables[r, k // B]`` row ``k % B``, so one tile gathers TILE_N / B cache blocks. Online
softmax in base 2, float32 accumulators.

Variants (one kernel each, sharing the ``@triton.jit`` helpers below):
  * ``_paged_attention_kernel``: one program per (tile, KV head); writes ``out`` directly.
  * ``_paged_attention_split_kernel`` + ``_combine_splits_kernel`` (flash-decoding): the
    context of each tile is cut into S splits run by separate programs, which write float32
    partials ``acc [T, H, S, D]`` (unnormalised), ``max`` and ``sum`` ``[T, H, S]``; the
    combine kernel merges them. For long-context decode with too few (tile, head) programs to
    fill the GPU.

Reference: ``caldera.kernels.reference.paged_attention_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caldera.kernels.metadata import AttentionMetadata

HEAD_SIZES = (16, 32, 64, 128, 256)
BLOCK_SIZES = (16, 32, 64)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634
# Padding of a sliding window that is absent: farther than any context.
NO_WINDOW = 1 << 30


# ==== shared helpers =========================================================================


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile_id, BLOCK_Q: tl.constexpr):
    """The request whose tiles contain ``tile_id``: the last r with qsl[r] // BLOCK_Q + r <= id."""
    lo: tl.int32 = 0  # typed: a loop-carried variable must keep one type
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid)
        if start // BLOCK_Q + mid <= tile_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _locate_tile(query_start_loc_ptr, seq_lens_ptr, num_reqs, tile_id, BLOCK_Q: tl.constexpr):
    """(request, its first row, q_len, seq_len, first new-token index of this tile)."""
    req = _find_request(query_start_loc_ptr, num_reqs, tile_id, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    first = (tile_id - (q_start // BLOCK_Q + req)) * BLOCK_Q
    return req, q_start, q_len, seq_len, first


@triton.jit
def _tile_rows(
    q_start,
    q_len,
    seq_len,
    first,
    kv_head,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
):
    """Per-row token index (in the flat batch), query head, validity and position."""
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = first + offs_m // GROUP
    valid = (offs_m < BLOCK_Q * GROUP) & (q_idx < q_len)
    token = (q_start + q_idx).to(tl.int64)
    head = kv_head * GROUP + offs_m % GROUP
    position = seq_len - q_len + q_idx
    return token, head, valid, position


@triton.jit
def _context_bounds(q_len, seq_len, first, window, BLOCK_Q: tl.constexpr):
    """[lo, hi): the context positions any row of the tile may see."""
    first_pos = seq_len - q_len + first
    hi = tl.minimum(first_pos + BLOCK_Q, seq_len)
    lo = tl.maximum(first_pos - window + 1, 0)
    return lo, hi


@triton.jit
def _attend(
    acc,  # [BLOCK_M, D] float32, unnormalised output
    m_i,  # [BLOCK_M] float32, running max of the base-2 scores
    l_i,  # [BLOCK_M] float32, running sum of exp2(score - m_i)
    q,  # [BLOCK_M, D] query dtype
    position,  # [BLOCK_M] int32, position of each row
    k_cache_ptr,  # *[N, B, Hkv, D], already offset to this KV head
    v_cache_ptr,  # *[N, B, Hkv, D], already offset to this KV head
    table_ptr,  # *[max_blocks] int32, this request's block table
    stride_k_n,
    stride_k_b,
    stride_v_n,
    stride_v_b,
    lo,
    hi,
    window,
    qk_scale,  # softmax scale * log2(e)
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the rows over context positions [lo, hi)."""
    offs_d = tl.arange(0, HEAD_SIZE)
    for start in range(lo, hi, TILE_N):
        # ---- gather TILE_N context tokens through the block table ------------------------
        offs_n = start + tl.arange(0, TILE_N)
        in_range = offs_n < hi
        block = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        row = offs_n % BLOCK_SIZE
        k = tl.load(  # [D, TILE_N]
            k_cache_ptr + (block * stride_k_n + row * stride_k_b)[None, :] + offs_d[:, None],
            mask=in_range[None, :],
            other=0.0,
        )
        v = tl.load(  # [TILE_N, D]
            v_cache_ptr + (block * stride_v_n + row * stride_v_b)[:, None] + offs_d[None, :],
            mask=in_range[:, None],
            other=0.0,
        )

        # ---- scores, masked to each row's visible positions -------------------------------
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, TILE_N]
        visible = (
            (offs_n[None, :] <= position[:, None])
            & (offs_n[None, :] > position[:, None] - window)
            & in_range[None, :]
        )
        s = tl.where(visible, s, float("-inf"))

        # ---- online softmax update (rows that saw nothing yet keep max -inf) -------------
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _load_query(q_ptr, token, head, valid, stride_qt, stride_qh, HEAD_SIZE: tl.constexpr):
    offs_d = tl.arange(0, HEAD_SIZE)
    return tl.load(  # [BLOCK_M, D]
        q_ptr + (token * stride_qt + head * stride_qh)[:, None] + offs_d[None, :],
        mask=valid[:, None],
        other=0.0,
    )


# ==== variant 1: one program per (tile, KV head) =============================================


@triton.jit
def _paged_attention_kernel(
    out_ptr,  # *[T, H, D] query dtype
    q_ptr,  # *[T, H, D]
    k_cache_ptr,  # *[N, B, Hkv, D]
    v_cache_ptr,  # *[N, B, Hkv, D]
    block_tables_ptr,  # *[R, max_blocks] int32
    query_start_loc_ptr,  # *[R + 1] int32
    seq_lens_ptr,  # *[R] int32
    num_reqs,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_k_n,
    stride_k_b,
    stride_k_h,
    stride_v_n,
    stride_v_b,
    stride_v_h,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- locate the tile; idle tiles leave at once --------------------------------------
    kv_head = tl.program_id(1)
    req, q_start, q_len, seq_len, first = _locate_tile(
        query_start_loc_ptr, seq_lens_ptr, num_reqs, tl.program_id(0), BLOCK_Q
    )
    if first >= q_len:
        return
    token, head, valid, position = _tile_rows(
        q_start, q_len, seq_len, first, kv_head, GROUP, BLOCK_M, BLOCK_Q
    )

    # ---- attend over the whole visible context ------------------------------------------
    q = _load_query(q_ptr, token, head, valid, stride_qt, stride_qh, HEAD_SIZE)
    lo, hi = _context_bounds(q_len, seq_len, first, window, BLOCK_Q)
    acc, m_i, l_i = _attend(
        tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32),
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.float32),
        q,
        position,
        k_cache_ptr + kv_head * stride_k_h,
        v_cache_ptr + kv_head * stride_v_h,
        block_tables_ptr + req.to(tl.int64) * stride_table,
        stride_k_n,
        stride_k_b,
        stride_v_n,
        stride_v_b,
        lo,
        hi,
        window,
        qk_scale,
        BLOCK_SIZE,
        HEAD_SIZE,
        TILE_N,
        DOT_PRECISION,
    )

    # ---- normalise and store the valid rows ---------------------------------------------
    offs_d = tl.arange(0, HEAD_SIZE)
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + (token * stride_ot + head * stride_oh)[:, None] + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=valid[:, None],
    )


# ==== variant 2: split context (flash-decoding) ==============================================


@triton.jit
def _paged_attention_split_kernel(
    part_acc_ptr,  # *[T, H, S, D] float32
    part_max_ptr,  # *[T, H, S] float32
    part_sum_ptr,  # *[T, H, S] float32
    q_ptr,  # *[T, H, D]
    k_cache_ptr,  # *[N, B, Hkv, D]
    v_cache_ptr,  # *[N, B, Hkv, D]
    block_tables_ptr,  # *[R, max_blocks] int32
    query_start_loc_ptr,  # *[R + 1] int32
    seq_lens_ptr,  # *[R] int32
    num_reqs,
    num_heads,
    qk_scale,
    window,
    stride_qt,
    stride_qh,
    stride_k_n,
    stride_k_b,
    stride_k_h,
    stride_v_n,
    stride_v_b,
    stride_v_h,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- locate the tile; idle tiles leave at once --------------------------------------
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    req, q_start, q_len, seq_len, first = _locate_tile(
        query_start_loc_ptr, seq_lens_ptr, num_reqs, tl.program_id(0), BLOCK_Q
    )
    if first >= q_len:
        return
    token, head, valid, position = _tile_rows(
        q_start, q_len, seq_len, first, kv_head, GROUP, BLOCK_M, BLOCK_Q
    )

    # ---- this split's share of the context, in whole TILE_N tiles (may be empty) --------
    lo, hi = _context_bounds(q_len, seq_len, first, window, BLOCK_Q)
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, TILE_N), NUM_SPLITS)
    split_lo = lo + split * tiles_per_split * TILE_N
    split_hi = tl.minimum(split_lo + tiles_per_split * TILE_N, hi)

    q = _load_query(q_ptr, token, head, valid, stride_qt, stride_qh, HEAD_SIZE)
    acc, m_i, l_i = _attend(
        tl.zeros([BLOCK_M, HEAD_SIZE], dtype=tl.float32),
        tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
        tl.zeros([BLOCK_M], dtype=tl.float32),
        q,
        position,
        k_cache_ptr + kv_head * stride_k_h,
        v_cache_ptr + kv_head * stride_v_h,
        block_tables_ptr + req.to(tl.int64) * stride_table,
        stride_k_n,
        stride_k_b,
        stride_v_n,
        stride_v_b,
        split_lo,
        split_hi,
        window,
        qk_scale,
        BLOCK_SIZE,
        HEAD_SIZE,
        TILE_N,
        DOT_PRECISION,
    )

    # ---- store the unnormalised partials of the valid rows ------------------------------
    offs_d = tl.arange(0, HEAD_SIZE)
    part = (token * num_heads + head) * NUM_SPLITS + split  # [BLOCK_M] index into [T, H, S]
    tl.store(part_max_ptr + part, m_i, mask=valid)
    tl.store(part_sum_ptr + part, l_i, mask=valid)
    tl.store(part_acc_ptr + part[:, None] * HEAD_SIZE + offs_d[None, :], acc, mask=valid[:, None])


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # *[T, H, D] query dtype
    part_acc_ptr,  # *[T, H, S, D] float32
    part_max_ptr,  # *[T, H, S] float32
    part_sum_ptr,  # *[T, H, S] float32
    stride_ot,
    stride_oh,
    num_heads,
    HEAD_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    # ---- the S partials of one (token, head) --------------------------------------------
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)  # [S]
    offs_d = tl.arange(0, HEAD_SIZE)
    m = tl.load(part_max_ptr + part)
    l_s = tl.load(part_sum_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_SIZE + offs_d[None, :])  # [S, D]

    # ---- rescale to the global max (empty splits have max -inf: weight 0) ---------------
    m_all = tl.max(m, axis=0)
    weight = tl.exp2(m - m_all)
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_s * weight, axis=0)
    tl.store(
        out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty)
    )


# ==== wrappers ===============================================================================


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether the kernels take these head size, block size and dtypes."""
    return (
        query.shape[-1] in HEAD_SIZES
        and key_cache.shape[1] in BLOCK_SIZES
        and query.dtype in DTYPES
        and key_cache.dtype == query.dtype
    )


def _check(query, key_cache, value_cache, metadata: AttentionMetadata, out) -> None:
    assert query.dim() == 3, f"query must be [T, H, D], got {tuple(query.shape)}"
    assert key_cache.dim() == 4 and key_cache.shape == value_cache.shape, (
        f"caches must be [N, B, Hkv, D] and alike, got {tuple(key_cache.shape)} and "
        f"{tuple(value_cache.shape)}"
    )
    num_heads, head_size = query.shape[1:]
    block_size, num_kv_heads = key_cache.shape[1:3]
    assert key_cache.shape[3] == head_size, (
        f"cache head size {key_cache.shape[3]} != query head size {head_size}"
    )
    assert num_heads % num_kv_heads == 0, (
        f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads"
    )
    assert head_size in HEAD_SIZES, f"head size {head_size} is not one of {HEAD_SIZES}"
    assert block_size in BLOCK_SIZES, f"block size {block_size} is not one of {BLOCK_SIZES}"
    assert query.dtype in DTYPES, f"query dtype {query.dtype} is not fp16, bf16 or fp32"
    assert key_cache.dtype == value_cache.dtype == query.dtype, (
        f"query {query.dtype} and caches {key_cache.dtype}/{value_cache.dtype} must share a dtype"
    )
    assert query.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1, (
        "query and caches must be contiguous in the head dimension"
    )
    int32 = (metadata.block_tables.dtype, metadata.query_start_loc.dtype, metadata.seq_lens.dtype)
    assert int32 == (torch.int32,) * 3, "block_tables, query_start_loc and seq_lens must be int32"
    assert metadata.block_tables.stride(-1) == 1, "block_tables rows must be contiguous"
    assert metadata.query_start_loc_host[-1] <= query.shape[0], (
        f"metadata covers {metadata.query_start_loc_host[-1]} tokens, query has {query.shape[0]}"
    )
    if out is not None:
        assert out.shape == query.shape and out.dtype == query.dtype, (
            f"out must be {tuple(query.shape)} {query.dtype}, got {tuple(out.shape)} {out.dtype}"
        )
        assert out.stride(-1) == 1, "out must be contiguous in the head dimension"


def _launch_shape(query, key_cache, metadata: AttentionMetadata) -> dict:
    """Tile sizes: 16-row tiles for decode-heavy batches, 64 rows when prefill dominates."""
    group = query.shape[1] // key_cache.shape[2]
    rows = 64 if metadata.max_query_len * group >= 64 else 16
    block_m = max(rows, triton.next_power_of_2(group))
    block_size = key_cache.shape[1]
    return {
        "GROUP": group,
        "HEAD_SIZE": query.shape[2],
        "BLOCK_SIZE": block_size,
        "BLOCK_M": block_m,
        "BLOCK_Q": block_m // group,
        "TILE_N": max(block_size, 64 if query.shape[2] <= 128 else 32),
        "DOT_PRECISION": "ieee" if query.dtype == torch.float32 else "tf32",
    }


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [T, H, D]; rows past the batch's tokens are left as is
) -> torch.Tensor:
    """Attention of every request's new tokens over its paged context, one program per tile."""
    _check(query, key_cache, value_cache, metadata, out)
    out = torch.empty_like(query) if out is None else out
    if metadata.num_reqs == 0:
        return out
    shape = _launch_shape(query, key_cache, metadata)
    num_tiles = metadata.query_start_loc_host[-1] // shape["BLOCK_Q"] + metadata.num_reqs
    _paged_attention_kernel[(num_tiles, key_cache.shape[2])](
        out,
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        metadata.num_reqs,
        scale * LOG2_E,
        metadata.sliding_window or NO_WINDOW,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        metadata.block_tables.stride(0),
        **shape,
        num_warps=4,
        num_stages=2,
    )
    return out


def paged_attention_split(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    metadata: AttentionMetadata,
    scale: float,
    num_splits: int,
    out: torch.Tensor | None = None,  # [T, H, D]
) -> torch.Tensor:
    """Flash-decoding variant: each tile's context is cut into ``num_splits`` programs."""
    _check(query, key_cache, value_cache, metadata, out)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, (
        f"num_splits must be a power of 2, got {num_splits}"
    )
    out = torch.empty_like(query) if out is None else out
    num_tokens = metadata.query_start_loc_host[-1]
    if metadata.num_reqs == 0 or num_tokens == 0:
        return out
    num_heads, head_size = query.shape[1:]
    shape = _launch_shape(query, key_cache, metadata)
    num_tiles = num_tokens // shape["BLOCK_Q"] + metadata.num_reqs
    part_acc = query.new_empty((num_tokens, num_heads, num_splits, head_size), dtype=torch.float32)
    part_max = query.new_empty((num_tokens, num_heads, num_splits), dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    _paged_attention_split_kernel[(num_tiles, key_cache.shape[2], num_splits)](
        part_acc,
        part_max,
        part_sum,
        query,
        key_cache,
        value_cache,
        metadata.block_tables,
        metadata.query_start_loc,
        metadata.seq_lens,
        metadata.num_reqs,
        num_heads,
        scale * LOG2_E,
        metadata.sliding_window or NO_WINDOW,
        query.stride(0),
        query.stride(1),
        *key_cache.stride()[:3],
        *value_cache.stride()[:3],
        metadata.block_tables.stride(0),
        **shape,
        NUM_SPLITS=num_splits,
        num_warps=4,
        num_stages=2,
    )
    _combine_splits_kernel[(num_tokens, num_heads)](
        out,
        part_acc,
        part_max,
        part_sum,
        out.stride(0),
        out.stride(1),
        num_heads,
        HEAD_SIZE=head_size,
        NUM_SPLITS=num_splits,
        num_warps=1 if head_size * num_splits <= 1024 else 4,
    )
    return out


def num_splits_for(
    metadata: AttentionMetadata, num_kv_heads: int, num_sms: int, min_context_per_split: int = 512
) -> int:
    """Splits that fill ``num_sms`` on a decode-only batch; 1 (no split) when not worth it."""
    if not metadata.is_decode_only:
        return 1
    programs = metadata.num_reqs * num_kv_heads
    by_occupancy = triton.cdiv(2 * num_sms, max(programs, 1))
    by_length = metadata.max_seq_len // min_context_per_split
    splits = min(by_occupancy, by_length, 64)
    return 1 if splits < 2 else 1 << (splits.bit_length() - 1)  # largest power of 2 <= splits
