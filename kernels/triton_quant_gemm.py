"""Weight-only quantized GEMMs (Triton): y = x @ dequant(W)^T + b, int8 and int4 weights.

Layouts (``torch.nn.Linear`` orientation; details in ``caldera.kernels.quant_reference``)::

    x        [M, K]              fp16 | bf16 | fp32 (fp32 for CPU testing)
    y        [M, N]              x dtype
    bias     [N]                 optional
    int8:    qweight [N, K] int8,   scales [N]             W[n, k] = q[n, k] * s[n]
    int4:    qweight [N, K_pad/2] uint8, two codes per byte along K (low nibble = even k),
             scales, zeros [N, K_pad/G]                    W[n, k] = (c[n, k] - z[n, g]) * s[n, g]
             g = k // G,  G = 32 | 64 | 128,  K_pad = ceil(K / G) * G

Tiling: a program computes y[BLOCK_M rows, BLOCK_N columns], walking K in BLOCK_K steps::

    x tile [BLOCK_M, BLOCK_K] ---.
                                 dot (float32 accumulator [BLOCK_M, BLOCK_N])
    W tile [BLOCK_K, BLOCK_N] ---'   dequantized in registers from the int8 / packed int4 tile

int8 folds the per-channel scale into the epilogue (int8 -> x dtype is exact). int4 loads
BLOCK_K / 2 bytes per column, splits the nibbles into the even-k and odd-k halves of the tile
and multiplies them with the even and odd columns of x (two dots; no interleave needed); a
group never straddles a byte, so both halves share one scale/zero tile.

Block sizes are autotuned on GPU, keyed on (bucketed M, N, K): small M (decode) prefers
BLOCK_M = 16 and narrow, deep weight tiles (many programs streaming weights); large M
(prefill) prefers square compute tiles. Under the interpreter a fixed config is used.

References: ``int8_linear_reference`` / ``int4_linear_reference`` in ``quant_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from caldera.kernels.quant_reference import check_int4_layout, check_int8_layout

# ==== shared helpers =========================================================================


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row/column offsets of this program's output tile, grouped along M for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _store_output(
    y_ptr,  # *[M, N]
    bias_ptr,  # *[N] or None
    acc,  # [BLOCK_M, BLOCK_N] float32
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
):
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(
        y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=mask,
    )


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


# ==== int8 ===================================================================================


@triton.jit
def _int8_gemm_kernel(
    y_ptr,  # *[M, N] x dtype
    x_ptr,  # *[M, K] fp16 | bf16 | fp32
    w_ptr,  # *[N, K] int8
    scales_ptr,  # *[N]
    bias_ptr,  # *[N] or None
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- output tile ---------------------------------------------------------------------
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]

    # ---- main loop: int8 tile -> x dtype (exact), float32 accumulate ---------------------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)

    # ---- epilogue: per-channel scale, bias ----------------------------------------------
    scales = tl.load(scales_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    _store_output(y_ptr, bias_ptr, acc * scales[None, :], offs_m, offs_n, M, N, stride_ym)


# ==== int4 ===================================================================================


@triton.jit
def _int4_gemm_kernel(
    y_ptr,  # *[M, N] x dtype
    x_ptr,  # *[M, K] fp16 | bf16 | fp32
    w_ptr,  # *[N, K_pad/2] uint8, low nibble = even k
    scales_ptr,  # *[N, K_pad/G]
    zeros_ptr,  # *[N, K_pad/G]
    bias_ptr,  # *[N] or None
    M,
    N,
    K,
    M_BUCKET,  # autotune key only
    stride_xm,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_ym,
    GROUP_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # ---- output tile ---------------------------------------------------------------------
    offs_m, offs_n = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1]
    w_cols = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn  # [1, BLOCK_N]
    s_cols = scales_ptr + offs_n[None, :].to(tl.int64) * stride_sn
    z_cols = zeros_ptr + offs_n[None, :].to(tl.int64) * stride_zn
    HALF_K: tl.constexpr = BLOCK_K // 2

    # ---- main loop over packed bytes: byte j holds k = 2j (low) and 2j + 1 (high) --------
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_j = k0 // 2 + tl.arange(0, HALF_K)  # byte index along packed K
        even_k = 2 * offs_j
        j_ok = even_k < K  # a pair never straddles K's padding: K_pad is even
        packed = tl.load(w_cols + offs_j[:, None], mask=j_ok[:, None] & n_ok[None, :], other=0)
        group = even_k // GROUP_SIZE  # same group for both nibbles: G is even
        scale = tl.load(s_cols + group[:, None], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        zero = tl.load(z_cols + group[:, None], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        scale = scale.to(tl.float32)
        zero = zero.to(tl.float32)

        # ---- dequantize both nibbles of the [HALF_K, BLOCK_N] tile ----------------------
        w_even = (((packed & 0x0F).to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)
        w_odd = (((packed >> 4).to(tl.float32) - zero) * scale).to(x_ptr.dtype.element_ty)

        # ---- even and odd columns of x (odd column past K reads 0) -----------------------
        x_even = tl.load(
            x_rows + even_k[None, :], mask=m_ok[:, None] & (even_k < K)[None, :], other=0.0
        )
        x_odd = tl.load(
            x_rows + even_k[None, :] + 1,
            mask=m_ok[:, None] & (even_k + 1 < K)[None, :],
            other=0.0,
        )
        acc = tl.dot(x_even, w_even, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd, w_odd, acc, input_precision=DOT_PRECISION)

    # ---- epilogue: bias -----------------------------------------------------------------
    _store_output(y_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_ym)


# ==== configs ================================================================================


def _configs() -> list[triton.Config]:
    def config(m, n, k, warps, stages):
        return triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
            num_warps=warps,
            num_stages=stages,
        )

    # Small M streams the weights: narrow columns (many programs), deep K steps.
    small = [config(16, n, k, w, 4) for n in (32, 64) for k in (128, 256) for w in (2, 4)]
    small += [config(16, 16, k, 2, 5) for k in (256, 512)]
    # Large M is compute bound: square-ish tiles.
    large = [
        config(m, n, k, w, 3)
        for m, n, w in ((64, 64, 4), (64, 128, 4), (128, 128, 8), (128, 256, 8))
        for k in (32, 64)
    ]
    return small + large


def _prune(configs, named_args, **kwargs):
    """Small M tries only the 16-row tiles, large M only the wider ones."""
    small = named_args["M_BUCKET"] <= 16
    return [c for c in configs if (c.kwargs["BLOCK_M"] == 16) == small]


def _autotuned(kernel):
    return triton.autotune(
        configs=_configs(),
        key=["M_BUCKET", "N", "K"],
        prune_configs_by={"early_config_prune": _prune},
    )(kernel)


_int8_gemm_tuned = _autotuned(_int8_gemm_kernel)
_int4_gemm_tuned = _autotuned(_int4_gemm_kernel)
# The interpreter cannot time configs: one fixed, small config.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 4}


def _launch(kernel, tuned, x2d, y, tensors, weight_strides, **constexprs) -> torch.Tensor:
    """Launches into y [M, N]: autotuned on GPU, the fixed config otherwise."""
    m, k = x2d.shape
    n = y.shape[1]
    if m == 0:
        return y
    bucket = min(triton.next_power_of_2(m), 512)
    args = (y, x2d, *tensors, m, n, k, bucket, x2d.stride(0), *weight_strides, y.stride(0))
    if x2d.is_cuda:

        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        tuned[grid](*args, **constexprs)
    else:
        cfg = _INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        kernel[grid](*args, **constexprs, **cfg)
    return y


# ==== wrappers ===============================================================================


def _flatten(x: torch.Tensor) -> torch.Tensor:
    assert x.dtype in (torch.float16, torch.bfloat16, torch.float32), (
        f"activations must be fp16, bf16 or fp32, got {x.dtype}"
    )
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _check_bias(bias, n: int, device) -> None:
    if bias is not None:
        assert bias.shape == (n,), f"bias must be [{n}], got {tuple(bias.shape)}"
        assert bias.is_contiguous() and bias.device == device, (
            "bias must be contiguous, on x's device"
        )


def _output(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    """out (or a new tensor) as y [M, N]."""
    shape = (*x.shape[:-1], n)
    if out is None:
        return x.new_empty(shape).view(-1, n)
    assert out.shape == shape and out.dtype == x.dtype and out.is_contiguous(), (
        f"out must be contiguous {shape} {x.dtype}, got {tuple(out.shape)} {out.dtype}"
    )
    return out.view(-1, n)


def int8_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N]
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [..., N]
) -> torch.Tensor:  # [..., N], x dtype
    """y = x @ (qweight * scales[:, None])^T + bias."""
    check_int8_layout(x, qweight, scales)
    n = qweight.shape[0]
    _check_bias(bias, n, x.device)
    assert qweight.stride(-1) == 1 and scales.is_contiguous(), "qweight rows and scales contiguous"
    assert qweight.device == scales.device == x.device, "x, qweight and scales on one device"
    x2d = _flatten(x)
    y = _launch(
        _int8_gemm_kernel,
        _int8_gemm_tuned,
        x2d,
        _output(x, n, out),
        (qweight, scales, bias),
        (qweight.stride(0),),
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y.view(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,  # [N, K_pad/2] uint8
    scales: torch.Tensor,  # [N, K_pad/G]
    zeros: torch.Tensor,  # [N, K_pad/G]
    group_size: int,
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [..., N]
) -> torch.Tensor:  # [..., N], x dtype
    """y = x @ dequant(qweight, scales, zeros)^T + bias, groups of ``group_size`` along K."""
    check_int4_layout(x, qweight, scales, zeros, group_size)
    n = qweight.shape[0]
    _check_bias(bias, n, x.device)
    assert qweight.stride(-1) == scales.stride(-1) == zeros.stride(-1) == 1, (
        "qweight, scales and zeros must be contiguous along K"
    )
    assert qweight.device == scales.device == zeros.device == x.device, (
        "x, qweight, scales and zeros on one device"
    )
    x2d = _flatten(x)
    y = _launch(
        _int4_gemm_kernel,
        _int4_gemm_tuned,
        x2d,
        _output(x, n, out),
        (qweight, scales, zeros, bias),
        (qweight.stride(0), scales.stride(0), zeros.stride(0)),
        GROUP_SIZE=group_size,
        DOT_PRECISION=_dot_precision(x.dtype),
    )
    return y.view(*x.shape[:-1], n)
