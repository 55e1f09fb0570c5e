"""PackedLinear (oneDNN-packed weights on CPU) against nn.Linear, and the worker's packing
pass over a loaded model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from caldera.worker import cpu_linear
from caldera.worker.cpu_linear import PackedLinear, pack_linears, supported
from caldera.worker.isq import model_bytes

pytestmark = pytest.mark.skipif(
    not cpu_linear.supported(torch.float32), reason="torch built without oneDNN"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 3, 64), (300, 64)], ids=str)
def test_packed_linear_matches_linear(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    expected = linear(x)
    got = PackedLinear(linear)(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16():
    if not supported(torch.bfloat16):
        assert pack_linears(nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16)),
                            torch.bfloat16) == 0  # left as plain linears, not an error
        pytest.skip("this CPU has no AVX-512 BW/VL/DQ or AVX-NE-CONVERT for oneDNN's bf16 path")
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    got = PackedLinear(linear)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), linear(x).float(), rtol=1e-2, atol=1e-2)


def test_pack_linears_swaps_plain_linears_only(monkeypatch):
    class Quantized(nn.Linear):  # stands for any nn.Linear subclass with its own forward
        pass

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Quantized(16, 4))
    x = torch.randn(3, 8)
    expected = model(x)
    before = model_bytes(model)
    assert pack_linears(model, torch.float32) == 1
    assert isinstance(model[0], PackedLinear) and type(model[2]) is Quantized
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert model_bytes(model) == before  # the packed weight is counted in place of the plain one

    monkeypatch.setenv("CALDERA_CPU_PACKED_LINEAR", "0")
    assert pack_linears(nn.Sequential(nn.Linear(8, 8)), torch.float32) == 0
    assert pack_linears(nn.Sequential(nn.Linear(8, 8).half()), torch.float16) == 0
