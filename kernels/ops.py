"""The dispatch points: one function per op, Triton on CUDA, torch everywhere else.

Each op picks its Triton kernel when the tensors are on a CUDA device and triton imports, and
a torch path otherwise (the CPU path, also the fallback on a GPU without triton). Layouts are
those of ``caldera.kernels.metadata`` (KV cache) and ``caldera.kernels.quant_reference``
(quantized weights). The kernel modules are imported on first use with a CUDA tensor, so
CPU-only processes never compile (or interpret) a kernel.

On CPU, attention runs every layer of every step, so it is batched by kind. Rows of requests
with few new tokens (decodes) go to the C++ op of ``caldera.kernels.cpu_attention``, which
reads the blocks in place; where that op cannot be built, they go to one padded,
length-masked SDPA over their gathered contexts. Each longer prefill chunk is one SDPA call
over its gathered context with a causal-offset mask. All of it accumulates in float32 like the
reference, so it matches it to float32 round-off.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from caldera.kernels import cpu_attention, quant_reference
from caldera.kernels.metadata import AttentionMetadata
from caldera.kernels.reference import gather_context

# Elements of gathered K (and again of V) per padded decode chunk on the torch path: 16 MiB
# of float32, so the gather buffers are recycled by the allocator rather than freshly mapped
# (first-touch page faults cost more than the attention itself).
_DECODE_GATHER_ELEMENTS = 1 << 22
# Requests with at most this many new tokens are attended row by row by the C++ op; longer
# chunks use SDPA, whose blocked matmuls win once the query has many rows.
_SHORT_QUERY = 8


@functools.cache
def _triton_kernels() -> SimpleNamespace | None:
    try:
        from caldera.kernels import triton_attention, triton_kv_write, triton_quant_gemm
    except ImportError:
        return None
    return SimpleNamespace(
        attention=triton_attention, kv_write=triton_kv_write, quant_gemm=triton_quant_gemm
    )


def _triton_for(tensor: torch.Tensor) -> SimpleNamespace | None:
    """The Triton kernels if ``tensor`` lives on CUDA and triton imports, else None."""
    return _triton_kernels() if tensor.is_cuda else None


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ==== KV write ===============================================================================


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    slot_mapping: torch.Tensor,  # [T] int64; negative = skip
) -> None:
    """Writes this step's keys and values into their cache slots."""
    if (kernels := _triton_for(key)) is not None:
        kernels.kv_write.write_kv(key, value, key_cache, value_cache, slot_mapping)
        return
    num_blocks, block_size = key_cache.shape[:2]
    if slot_mapping.numel() == 0:
        return
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    for src, cache in ((key, key_cache), (value, value_cache)):
        flat = cache.view(num_blocks * block_size, *cache.shape[2:])
        flat.index_copy_(0, slot_mapping, src.to(cache.dtype))


# ==== paged attention ========================================================================


def paged_attention(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D], query dtype
    """Attention of each request's new tokens over its cached context (causal in the chunk)."""
    kernels = _triton_for(query)
    if kernels is not None and kernels.attention.supports(query, key_cache):
        attention = kernels.attention
        splits = attention.num_splits_for(metadata, key_cache.shape[2], _num_sms(query.device))
        if splits > 1:
            return attention.paged_attention_split(
                query, key_cache, value_cache, metadata, scale, splits
            )
        return attention.paged_attention(query, key_cache, value_cache, metadata, scale)
    return paged_attention_cpu(query, key_cache, value_cache, metadata, scale)


def paged_attention_cpu(
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    metadata: AttentionMetadata,
    scale: float,
    *,
    native: bool | None = None,
) -> torch.Tensor:  # [T, H, D]
    """The CPU path (also the fallback for CUDA tensors without triton): short queries
    through the C++ op (or padded SDPA), one SDPA per longer prefill chunk. ``native``: use
    the C++ op (None: on CPU tensors when it builds; False: never)."""
    out = torch.empty_like(query)
    starts, seq_lens = metadata.query_start_loc_host, metadata.seq_lens_host
    query_lens = [starts[r + 1] - starts[r] for r in range(metadata.num_reqs)]
    if native is None:
        native = query.device.type == "cpu" and cpu_attention.load()
    if native:
        plan = cpu_attention.row_plan(metadata, _SHORT_QUERY)
        if plan.reqs:
            cpu_attention.paged_attention_rows(
                out, query, key_cache, value_cache, metadata, plan, scale
            )
        short = plan.reqs
    else:
        short = [r for r in range(metadata.num_reqs) if query_lens[r] == 1]
        row_width = key_cache.shape[2] * key_cache.shape[3]
        for chunk in _decode_chunks(sorted(short, key=lambda r: seq_lens[r]), seq_lens, row_width):
            _decode_chunk(out, query, key_cache, value_cache, metadata, chunk, scale)
    done = set(short)
    for r in range(metadata.num_reqs):
        if query_lens[r] > 0 and r not in done:
            _prefill_one(out, query, key_cache, value_cache, metadata, r, scale)
    return out


def _decode_chunks(reqs: list[int], seq_lens: list[int], row_width: int) -> list[list[int]]:
    """Consecutive runs of ``reqs`` (sorted by length) whose padded gather stays within the
    budget and, past a small size, pads by at most a quarter of the exact context."""
    chunks: list[list[int]] = []
    chunk: list[int] = []
    exact = 0
    for r in reqs:
        padded = (len(chunk) + 1) * seq_lens[r] * row_width
        wasteful = padded > 1.25 * (exact + seq_lens[r]) * row_width and padded > 1 << 18
        if chunk and (padded > _DECODE_GATHER_ELEMENTS or wasteful):
            chunks.append(chunk)
            chunk, exact = [], 0
        chunk.append(r)
        exact += seq_lens[r]
    return [*chunks, chunk] if chunk else chunks


def _decode_chunk(out, query, key_cache, value_cache, metadata, reqs: list[int], scale) -> None:
    """One new token per request: gather the contexts padded to the longest, mask the rest."""
    block_size = key_cache.shape[1]
    device = query.device
    lens = [metadata.seq_lens_host[r] for r in reqs]
    rows = torch.tensor([metadata.query_start_loc_host[r] for r in reqs], device=device)
    num_blocks = -(-max(lens) // block_size)
    tables = metadata.block_tables[torch.tensor(reqs, device=device), :num_blocks].long()
    flat_tables = tables.flatten()

    def gather(cache):  # [R, Hkv, S, D] float32, a strided view of one gathered copy
        # Rows of whole blocks, selected from a 2-D view: several times faster than indexing
        # the 4-D cache, which copies element by element.
        blocks = torch.index_select(cache.view(cache.shape[0], -1), 0, flat_tables)
        return blocks.view(len(reqs), -1, *cache.shape[2:]).transpose(1, 2).float()

    positions = torch.arange(num_blocks * block_size, device=device)[None, :]
    seq = torch.tensor(lens, device=device)[:, None]
    visible = positions < seq  # [R, S]
    if metadata.sliding_window is not None:
        visible &= positions > seq - 1 - metadata.sliding_window
    result = F.scaled_dot_product_attention(
        query[rows].float()[:, :, None, :],  # [R, H, 1, D]
        gather(key_cache),
        gather(value_cache),
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=True,
    )  # [R, H, 1, D]
    out[rows] = result[:, :, 0].to(out.dtype)


def _prefill_one(out, query, key_cache, value_cache, metadata, r: int, scale) -> None:
    """One SDPA over the request's gathered context; causal offset by its cached prefix."""
    start, end = metadata.query_start_loc_host[r], metadata.query_start_loc_host[r + 1]
    seq_len = metadata.seq_lens_host[r]
    q_len = end - start
    table = metadata.block_tables[r]
    keys = gather_context(key_cache, table, seq_len).float().transpose(0, 1)  # [Hkv, S, D]
    values = gather_context(value_cache, table, seq_len).float().transpose(0, 1)
    q = query[start:end].float().transpose(0, 1)  # [H, q, D]
    mask = None
    window = metadata.sliding_window
    if q_len != seq_len or window is not None:
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        k_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
    result = F.scaled_dot_product_attention(
        q[None],
        keys[None],
        values[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )  # [1, H, q, D]
    out[start:end] = result[0].transpose(0, 1).to(out.dtype)


# ==== weight-only quantized linears ==========================================================


def int8_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x dtype
    """y = x @ (qweight * scales[:, None])^T + bias."""
    if (kernels := _triton_for(x)) is not None:
        return kernels.quant_gemm.int8_linear(x, qweight, scales, bias)
    return quant_reference.int8_linear_torch(x, qweight, scales, bias)


def int4_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/G]
    zeros: torch.Tensor,  # [N, K_pad/G]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x dtype
    """y = x @ dequant(qweight, scales, zeros)^T + bias (groups of ``group_size`` along K)."""
    if (kernels := _triton_for(x)) is not None:
        return kernels.quant_gemm.int4_linear(x, qweight, scales, zeros, group_size, bias)
    return quant_reference.int4_linear_torch(x, qweight, scales, zeros, group_size, bias)
