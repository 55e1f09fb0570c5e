"""The dispatch points: the CPU attention paths (the C++ op, and the pure-torch fallback used
where it cannot be built) against the reference, to float32 round-off, on the same random
ragged batches as the kernels; KV write and the quantized linears through ops. With a GPU the
same checks run on CUDA tensors, through Triton."""

from __future__ import annotations

import random

import pytest
import torch

from caldera.kernels import cpu_attention, ops, quant_reference
from caldera.kernels.reference import write_kv_reference

OPS_DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]
# Attention paths: "cpu" is the C++ op (it must build where the tests run; set
# CALDERA_CPU_KERNELS=0 to test without it), "cpu-torch" the fallback without it.
ATTENTION_PATHS = ["cpu", "cpu-torch", OPS_DEVICES[-1]]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GQA = [(2, 2), (8, 2), (8, 1)]
# The torch path computes in float32 like the reference; in fp32 they agree to round-off.
ATOL_TORCH = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture
def path_device(request, monkeypatch) -> str:
    """The device of the attention path under test, with the C++ op on or off."""
    path = request.param
    if path == "cpu-torch":
        monkeypatch.setattr(cpu_attention, "load", lambda: False)
    elif path == "cpu" and cpu_attention.enabled():
        assert cpu_attention.load(), "the C++ CPU attention op did not build (see the log)"
    return "cuda" if path == "cuda" else "cpu"


def _attention(batch) -> torch.Tensor:
    return ops.paged_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale
    )


def _check(out, batch, atol) -> None:
    got = out.float().cpu()
    assert not got.isnan().any()
    torch.testing.assert_close(got, batch.reference().float(), atol=atol, rtol=0)


@pytest.mark.parametrize("path_device", ATTENTION_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
# Head sizes 64 and 128 take the C++ op's unrolled loops, 80 its generic one.
@pytest.mark.parametrize("shape", [(64, 16), (128, 32), (80, 16)],
                         ids=lambda s: f"d{s[0]}-b{s[1]}")
def test_paged_attention_mixed_batch(kit, path_device, dtype, heads, shape):
    rng = random.Random(shape[0] + heads[0] * 10 + heads[1])
    batch = kit.build_batch(
        *kit.mixed_lengths(rng, shape[1]),
        num_heads=heads[0],
        num_kv_heads=heads[1],
        head_size=shape[0],
        block_size=shape[1],
        dtype=dtype,
        device=path_device,
        seed=1,
    )
    atol = ATOL_TORCH[dtype] if path_device == "cpu" else kit.atol[dtype]
    _check(_attention(batch), batch, atol)


@pytest.mark.parametrize("path_device", ATTENTION_PATHS, indirect=True)
@pytest.mark.parametrize(
    ("query_lens", "context_lens"),
    [
        ([1] * 6, [0, 5, 16, 31, 70, 200]),  # decode-only
        ([40], [0]),  # a fresh prefill: plain causal
        ([17, 9], [33, 0]),  # prefill-only, one after a cached prefix
        ([3, 1, 8, 2], [20, 7, 0, 45]),  # short chunks: row by row on the C++ path
    ],
    ids=["decodes", "fresh-prefill", "prefills", "short-chunks"],
)
def test_paged_attention_batch_kinds(kit, path_device, query_lens, context_lens):
    batch = kit.build_batch(
        query_lens,
        context_lens,
        num_heads=8,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=path_device,
        seed=2,
    )
    _check(_attention(batch), batch, ATOL_TORCH[torch.float32])


@pytest.mark.parametrize("path_device", ATTENTION_PATHS, indirect=True)
def test_paged_attention_sliding_window(kit, path_device):
    batch = kit.build_batch(
        [1, 1, 5, 12, 30],
        [40, 3, 18, 20, 0],
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device=path_device,
        seed=3,
        sliding_window=10,
    )
    _check(_attention(batch), batch, ATOL_TORCH[torch.float32])


def test_decodes_split_into_gather_chunks(kit, monkeypatch):
    # On the torch fallback, a small gather budget forces several padded chunks; the result
    # must not change.
    monkeypatch.setattr(cpu_attention, "load", lambda: False)
    monkeypatch.setattr(ops, "_DECODE_GATHER_ELEMENTS", 64 * 2 * 64)
    batch = kit.build_batch(
        [1] * 7 + [5],
        [3, 90, 17, 64, 1, 33, 50, 10],
        num_heads=4,
        num_kv_heads=2,
        head_size=64,
        block_size=16,
        dtype=torch.float32,
        device="cpu",
        seed=4,
    )
    _check(_attention(batch), batch, ATOL_TORCH[torch.float32])


@pytest.mark.parametrize("device", OPS_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_write_kv_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    key = torch.randn(10, 2, 64, generator=gen).to(device)
    value = torch.randn(10, 2, 64, generator=gen).to(device)
    slots = torch.tensor([3, 40, -1, 7, 0, 63, -1, 12, 13, 50], device=device)
    shape = (4, 16, 2, 64)
    expected = [torch.full(shape, float("nan"), dtype=dtype, device=device) for _ in range(2)]
    got = [c.clone() for c in expected]
    write_kv_reference(key, value, *expected, slots)
    ops.write_kv(key, value, *got, slots)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("device", OPS_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantized_linears_match_references(device, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=gen).to(device, dtype)
    bias = torch.randn(40, generator=gen).to(device, dtype)
    q8 = torch.randint(-127, 128, (40, 96), generator=gen, dtype=torch.int8).to(device)
    s8 = (torch.rand(40, generator=gen) * 0.02).to(device, dtype)
    q4 = torch.randint(0, 256, (40, 64), generator=gen, dtype=torch.uint8).to(device)
    s4 = (torch.rand(40, 2, generator=gen) * 0.02).to(device, dtype)
    z4 = torch.randint(0, 16, (40, 2), generator=gen).to(device, dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, expected in (
        (
            ops.int8_linear(x, q8, s8, bias),
            quant_reference.int8_linear_reference(x.cpu(), q8.cpu(), s8.cpu(), bias.cpu()),
        ),
        (
            ops.int4_linear(x, q4, s4, z4, 64, bias),
            quant_reference.int4_linear_reference(
                x.cpu(), q4.cpu(), s4.cpu(), z4.cpu(), 64, bias.cpu()
            ),
        ),
    ):
        assert got.shape == (3, 5, 40) and got.dtype == dtype
        error = (got.float().cpu() - expected.float()).abs().max() / expected.float().abs().max()
        assert error < tol
