"""Torch references and CPU paths of the weight-only quantized GEMMs.

Weights follow ``torch.nn.Linear``: ``weight [N, K]`` (out_features x in_features) and
``y = x @ W^T + b``.

int8, symmetric per output channel::

    qweight [N, K] int8 in -127..127      W[n, k] = qweight[n, k] * scales[n]
    scales  [N]    float (the model dtype)

int4, asymmetric group-wise along K (groups of G = 32 | 64 | 128 input features)::

    K_pad   = ceil(K / G) * G             the tail of the last group is padded with zeros
    qweight [N, K_pad // 2] uint8         two codes per byte along K:
                                          byte j of row n = code[n, 2j] | code[n, 2j + 1] << 4
                                          (low nibble: even k, high nibble: odd k)
    scales  [N, K_pad // G] float         codes are 0..15
    zeros   [N, K_pad // G] float         integer zero points 0..15, stored in the scale dtype
    W[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G]

References compute in float32 and return the activation dtype. The ``*_torch`` functions are
the CPU paths: the same result to float32 round-off, without materialising the float weight.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128)
# Float32 weight elements dequantized per step of the CPU paths (4 MiB: stays in cache).
_CPU_CHUNK_ELEMENTS = 1 << 20


# ==== packing ================================================================================


def pack_int4(codes: torch.Tensor) -> torch.Tensor:  # [N, K_pad] 0..15 -> [N, K_pad/2] uint8
    assert codes.shape[-1] % 2 == 0, f"cannot pack an odd number ({codes.shape[-1]}) of codes"
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:  # [N, K_pad/2] uint8 -> [N, K_pad] uint8
    assert qweight.dtype == torch.uint8, f"packed int4 weights are uint8, got {qweight.dtype}"
    return torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(-2)


# ==== dequantization =========================================================================


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 weight of an int8 per-channel quantized linear."""
    return qweight.float() * scales.float()[:, None]


def dequantize_int4(
    qweight: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/G]
    zeros: torch.Tensor,  # [N, K_pad/G]
    group_size: int,
    in_features: int | None = None,
) -> torch.Tensor:  # [N, in_features] float32
    """Float32 weight of an int4 group-wise quantized linear (dropping the K padding)."""
    codes = unpack_int4(qweight).float()
    n, k_pad = codes.shape
    groups = codes.view(n, k_pad // group_size, group_size)
    weight = (groups - zeros.float()[..., None]) * scales.float()[..., None]
    return weight.view(n, k_pad)[:, : in_features or k_pad]


def check_int4_layout(x, qweight, scales, zeros, group_size) -> None:
    k = x.shape[-1]
    n, half = qweight.shape
    assert qweight.dtype == torch.uint8, f"int4 qweight must be packed uint8, got {qweight.dtype}"
    assert group_size in INT4_GROUP_SIZES, f"group size {group_size} not in {INT4_GROUP_SIZES}"
    assert 2 * half % group_size == 0 and 0 <= 2 * half - k < group_size, (
        f"qweight [{n}, {half}] does not hold {k} input features padded to groups of {group_size}"
    )
    groups = 2 * half // group_size
    assert scales.shape == zeros.shape == (n, groups), (
        f"scales and zeros must be [{n}, {groups}], got {tuple(scales.shape)} and "
        f"{tuple(zeros.shape)}"
    )


def check_int8_layout(x, qweight, scales) -> None:
    assert qweight.dtype == torch.int8, f"int8 qweight must be int8, got {qweight.dtype}"
    assert qweight.dim() == 2 and qweight.shape[1] == x.shape[-1], (
        f"qweight {tuple(qweight.shape)} does not take {x.shape[-1]} input features"
    )
    assert scales.shape == (qweight.shape[0],), (
        f"scales must be [{qweight.shape[0]}], got {tuple(scales.shape)}"
    )


# ==== references =============================================================================


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        y = y + bias.float()
    return y.to(dtype)


def int8_linear_reference(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x.dtype
    check_int8_layout(x, qweight, scales)
    return _finish(x.float() @ dequantize_int8(qweight, scales).T, bias, x.dtype)


def int4_linear_reference(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/G]
    zeros: torch.Tensor,  # [N, K_pad/G]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x.dtype
    check_int4_layout(x, qweight, scales, zeros, group_size)
    weight = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1])
    return _finish(x.float() @ weight.T, bias, x.dtype)


# ==== CPU paths ==============================================================================
# Computed in float32 whatever the activation dtype (CPU half matmuls are slower than float32
# ones), a chunk of output rows at a time so the dequantized chunk stays in cache.


def _chunk_rows(k: int) -> int:
    return max(16, _CPU_CHUNK_ELEMENTS // k)


def int8_linear_torch(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x dtype
    """CPU int8 path: int8 rows widened to float32 chunk by chunk, scales applied to y."""
    check_int8_layout(x, qweight, scales)
    n, k = qweight.shape
    x2d = x.reshape(-1, k)
    if x.dtype == torch.bfloat16 and x2d.shape[0] <= 4 and k % 32 == 0 and x.device.type == "cpu":
        # torch's fused int8-weight kernel wins for bf16 decode-sized batches on CPU (it
        # crashes when K is not a multiple of 16).
        y = torch._weight_int8pack_mm(x2d.contiguous(), qweight, scales.to(x.dtype)).float()
    else:
        x2d = x2d.float()
        y = x2d.new_empty((x2d.shape[0], n))
        rows = _chunk_rows(k)
        chunk = x2d.new_empty((min(rows, n), k))
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            weight = chunk[: stop - start].copy_(qweight[start:stop])
            torch.mm(x2d, weight.T, out=y[:, start:stop])
        y.mul_(scales.float())
    return _finish(y, bias, x.dtype).view(*x.shape[:-1], n)


def int4_linear_torch(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/G]
    zeros: torch.Tensor,  # [N, K_pad/G]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [..., N], x dtype
    """CPU int4 path, with the zero points folded out of the weights::

        y[n] = sum_g s[n, g] * (sum_{k in g} x[k] c[n, k]  -  z[n, g] * sum_{k in g} x[k])

    so a chunk is dequantized with one multiply: its low nibbles (even k) fill the first half
    of each row and its high nibbles (odd k) the second, against x's columns reordered alike.
    """
    check_int4_layout(x, qweight, scales, zeros, group_size)
    n, half = qweight.shape
    k, k_pad = x.shape[-1], 2 * half
    groups = k_pad // group_size
    x2d = torch.nn.functional.pad(x.reshape(-1, k).float(), (0, k_pad - k))
    x_split = torch.cat((x2d[:, 0::2], x2d[:, 1::2]), dim=1)  # [M, K_pad]: even k, then odd k
    scales = scales.float()
    group_sums = x2d.view(-1, groups, group_size).sum(dim=-1)  # [M, groups]
    y = torch.mm(group_sums, (scales * zeros.float()).T).neg_()  # [M, N]
    rows = _chunk_rows(k_pad)
    chunk = x2d.new_empty((min(rows, n), 2, half))
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        packed, weight = qweight[start:stop], chunk[: stop - start]
        torch.bitwise_and(packed, 0x0F, out=weight[:, 0])
        torch.bitwise_right_shift(packed, 4, out=weight[:, 1])
        # [rows, nibble, group, G/2]: both nibble halves of a group share its scale
        weight.view(-1, 2, groups, group_size // 2).mul_(scales[start:stop, None, :, None])
        y[:, start:stop].addmm_(x_split, weight.view(-1, k_pad).T)
    return _finish(y, bias, x.dtype).view(*x.shape[:-1], n)
