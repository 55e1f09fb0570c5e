"""Triton int8 / int4 weight-only GEMMs against their torch references: every activation
dtype, decode- and prefill-sized M, K not a multiple of the block or the group (padded int4
groups), group sizes 32/64/128, with and without bias, leading batch dimensions."""

from __future__ import annotations

import pytest
import torch

from caldera.kernels import quant_reference, triton_quant_gemm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the largest output: float32 round-off, or one rounding of dequantized weights
# and outputs to the half dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _max_rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.float().cpu(), expected.float().cpu()
    assert not got.isnan().any(), "some outputs were never written"
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _int8_weights(n, k, dtype, device, gen):
    qweight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales = torch.rand(n, generator=gen) * 0.02 + 1e-3
    return qweight.to(device), scales.to(device, dtype)


def _int4_weights(n, k, group_size, dtype, device, gen):
    groups = -(-k // group_size)
    qweight = torch.randint(0, 256, (n, groups * group_size // 2), generator=gen, dtype=torch.uint8)
    scales = torch.rand(n, groups, generator=gen) * 0.02 + 1e-3
    zeros = torch.randint(0, 16, (n, groups), generator=gen).float()
    return qweight.to(device), scales.to(device, dtype), zeros.to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("m", "n", "k", "bias"), [(1, 48, 96, True), (37, 80, 200, False)])
def test_int8_matches_reference(device, dtype, m, n, k, bias):
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    qweight, scales = _int8_weights(n, k, dtype, device, gen)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = triton_quant_gemm.int8_linear(x, qweight, scales, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = quant_reference.int8_linear_reference(
        x.cpu(), qweight.cpu(), scales.cpu(), None if b is None else b.cpu()
    )
    assert _max_rel_error(got, expected) < RTOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("m", "n", "k", "group_size", "bias"),
    [(1, 48, 128, 32, True), (19, 64, 200, 64, False), (33, 40, 136, 128, True)],
)
def test_int4_matches_reference(device, dtype, m, n, k, group_size, bias):
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen).to(device, dtype)
    qweight, scales, zeros = _int4_weights(n, k, group_size, dtype, device, gen)
    b = torch.randn(n, generator=gen).to(device, dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = triton_quant_gemm.int4_linear(x, qweight, scales, zeros, group_size, b, out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = quant_reference.int4_linear_reference(
        x.cpu(),
        qweight.cpu(),
        scales.cpu(),
        zeros.cpu(),
        group_size,
        None if b is None else b.cpu(),
    )
    assert _max_rel_error(got, expected) < RTOL[dtype]


def test_leading_dimensions_are_kept(device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=gen).to(device)
    qweight, scales = _int8_weights(32, 64, torch.float32, device, gen)
    got = triton_quant_gemm.int8_linear(x, qweight, scales)
    assert got.shape == (2, 3, 32)
    expected = quant_reference.int8_linear_reference(x.cpu(), qweight.cpu(), scales.cpu())
    assert _max_rel_error(got, expected) < RTOL[torch.float32]


def test_int4_rejects_a_wrong_padding(device):
    x = torch.zeros(1, 64, device=device)
    qweight, scales, zeros = _int4_weights(8, 192, 64, torch.float32, device, torch.Generator())
    with pytest.raises(AssertionError, match="does not hold 64 input features"):
        triton_quant_gemm.int4_linear(x, qweight, scales, zeros, 64)
