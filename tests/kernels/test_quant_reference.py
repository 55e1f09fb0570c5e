"""The quantized-GEMM references and their CPU paths: packing, dequantization, and the
chunked CPU paths against the references (float32 round-off), including padded int4 groups."""

from __future__ import annotations

import pytest
import torch

from caldera.kernels import quant_reference as qr


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    packed = qr.pack_int4(codes)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0], codes[:, 0] | (codes[:, 1] << 4))  # low nibble = even k
    assert torch.equal(qr.unpack_int4(packed), codes)


def test_dequantize_int4_follows_the_layout():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    scales = torch.rand(3, 2)
    zeros = torch.randint(0, 16, (3, 2)).float()
    weight = qr.dequantize_int4(qr.pack_int4(codes), scales, zeros, 32, in_features=50)
    assert weight.shape == (3, 50)
    n, k = 2, 37  # group 1
    assert weight[n, k] == (codes[n, k].float() - zeros[n, 1]) * scales[n, 1]


def _case(m, n, k, group_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // group_size)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    s8 = (torch.rand(n, generator=gen) * 0.02).to(dtype)
    q4 = torch.randint(0, 256, (n, groups * group_size // 2), generator=gen, dtype=torch.uint8)
    s4 = (torch.rand(n, groups, generator=gen) * 0.02).to(dtype)
    z4 = torch.randint(0, 16, (n, groups), generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return x, (q8, s8), (q4, s4, z4), bias


def _rel(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


@pytest.mark.parametrize(
    ("m", "n", "k", "group_size"),
    [(1, 600, 96, 32), (7, 40, 100, 64), (130, 33, 256, 128), (2, 24, 5000, 128)],
)
def test_cpu_paths_match_references_in_float32(m, n, k, group_size):
    # Shapes cross the chunk size (600 rows, 5000 columns) and pad the last int4 group.
    x, int8, int4, bias = _case(m, n, k, group_size, torch.float32)
    assert (
        _rel(qr.int8_linear_torch(x, *int8, bias), qr.int8_linear_reference(x, *int8, bias)) < 1e-5
    )
    assert _rel(qr.int8_linear_torch(x, *int8), qr.int8_linear_reference(x, *int8)) < 1e-5
    got = qr.int4_linear_torch(x, *int4, group_size, bias)
    assert _rel(got, qr.int4_linear_reference(x, *int4, group_size, bias)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 9])  # bf16 with M <= 4 takes torch's int8pack kernel ...
@pytest.mark.parametrize("k", [160, 100])  # ... when K is a multiple of 32
def test_cpu_paths_in_half_dtypes(dtype, m, k):
    x, int8, int4, bias = _case(m, 48, k, 32, dtype, seed=1)
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    got = qr.int8_linear_torch(x, *int8, bias)
    assert got.dtype == dtype and _rel(got, qr.int8_linear_reference(x, *int8, bias)) < tol
    got = qr.int4_linear_torch(x, *int4, 32, bias)
    assert got.dtype == dtype and _rel(got, qr.int4_linear_reference(x, *int4, 32, bias)) < tol


def test_layout_checks_say_what_is_wrong():
    x = torch.zeros(2, 64)
    with pytest.raises(AssertionError, match="int8 qweight must be int8"):
        qr.int8_linear_reference(x, torch.zeros(4, 64), torch.ones(4))
    with pytest.raises(AssertionError, match="scales and zeros must be"):
        qr.int4_linear_reference(
            x, torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 1), torch.ones(4, 2), 64
        )
