"""In-situ quantization: error bounds of the quantizers, quantized linears against float
linears, the spec parser's mapping of user values, and which linears the transforms swap."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from caldera.worker import isq


def _gaussian(n: int, k: int, dtype=torch.float32, seed=0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


# ==== quantizers =============================================================================


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_error_is_within_half_a_step(dtype):
    weight = _gaussian(64, 300, dtype)
    weight[3] = 0  # an all-zero row must not divide by zero
    qweight, scales = isq.quantize_int8(weight)
    assert qweight.dtype == torch.int8 and scales.dtype == dtype and scales.shape == (64,)
    assert qweight.abs().max() <= 127
    error = (isq.dequantize_int8(qweight, scales) - weight.float()).abs()
    assert (error <= scales.float()[:, None] * 0.5 * (1 + 1e-5)).all()
    assert (qweight[3] == 0).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_within_half_a_step(group_size):
    weight = _gaussian(48, 320, seed=group_size)  # 320: the last group of 128 is padded
    weight[:, :group_size] += 0.05  # a group of one sign: its range is widened to 0
    qweight, scales, zeros = isq.quantize_int4(weight, group_size)
    groups = math.ceil(320 / group_size)
    assert qweight.shape == (48, groups * group_size // 2) and qweight.dtype == torch.uint8
    assert scales.shape == zeros.shape == (48, groups)
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    restored = isq.dequantize_int4(qweight, scales, zeros, group_size, 320)
    step = scales.float().repeat_interleave(group_size, dim=1)[:, :320]
    assert ((restored - weight).abs() <= step * 0.5 * (1 + 1e-5)).all()


def test_int4_padding_dequantizes_to_exact_zeros():
    qweight, scales, zeros = isq.quantize_int4(_gaussian(4, 40), 32)
    padded = isq.dequantize_int4(qweight, scales, zeros, 32)  # all 64 columns
    assert (padded[:, 40:] == 0).all()


def test_int4_bf16_scales_stay_within_a_widened_step():
    # bf16 scales are rounded before the codes are chosen; the bound loosens a little.
    weight = _gaussian(32, 256, torch.bfloat16, seed=5)
    qweight, scales, zeros = isq.quantize_int4(weight, 64)
    restored = isq.dequantize_int4(qweight, scales, zeros, 64)
    step = scales.float().repeat_interleave(64, dim=1)
    assert ((restored - weight.float()).abs() <= step * 0.6).all()


# ==== modules ================================================================================


def _linear(k: int, n: int, bias: bool, seed: int = 0) -> nn.Linear:
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(_gaussian(n, k, seed=seed))
    return linear


@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_matches_float_linear(bias):
    linear = _linear(256, 96, bias)
    quantized = isq.Int8Linear.from_linear(linear)
    x = torch.randn(2, 7, 256)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
        # exact against the dequantized weight (float32 round-off) ...
        dequantized = isq.dequantize_int8(quantized.qweight, quantized.scales)
        exact = nn.functional.linear(x, dequantized, linear.bias)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    # ... and within 1% (relative Frobenius error) of the float linear: int8 steps are
    # ~1/127 of a row's largest weight.
    assert ((got - expected).norm() / expected.norm()).item() < 0.01


@pytest.mark.parametrize(("group_size", "bound"), [(32, 0.09), (128, 0.12)])
def test_int4_linear_matches_float_linear(group_size, bound):
    # Gaussian weights: an int4 step is ~1/15 of a group's range (about 4 to 5 sigma), so the
    # weight error has an RMS near step / sqrt(12): ~8% of sigma for G=32, ~10% for G=128.
    linear = _linear(512, 64, bias=True, seed=1)
    quantized = isq.Int4Linear.from_linear(linear, group_size)
    x = torch.randn(9, 512)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
        dequantized = isq.dequantize_int4(
            quantized.qweight, quantized.scales, quantized.zeros, group_size, 512
        )
        exact = nn.functional.linear(x, dequantized, linear.bias)
    torch.testing.assert_close(got, exact, atol=1e-5, rtol=1e-5)
    assert ((got - expected).norm() / expected.norm()).item() < bound


def test_modules_keep_dtype_device_and_shapes():
    linear = _linear(100, 30, bias=True).to(torch.bfloat16)
    int8, int4 = isq.Int8Linear.from_linear(linear), isq.Int4Linear.from_linear(linear, 64)
    for module in (int8, int4):
        assert (module.in_features, module.out_features) == (100, 30)
        assert module.scales.dtype == module.bias.dtype == torch.bfloat16
        assert all(not t.is_meta for t in module.state_dict().values())
        out = module(torch.randn(4, 100, dtype=torch.bfloat16))
        assert out.shape == (4, 30) and out.dtype == torch.bfloat16
    assert set(int4.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    assert int4.qweight.shape == (30, 64)  # 100 features padded to 128, two per byte


# ==== spec parsing ===========================================================================


@pytest.mark.parametrize(
    ("value", "bits", "group"),
    [
        (4, 4, 128),
        ("4", 4, 128),
        ("int4", 4, 128),
        ("INT4", 4, 128),
        (8, 8, None),
        ("8", 8, None),
        ("int8", 8, None),
        ("Q4K", 4, 32),
        ("q4k", 4, 32),
        ("Q4_0", 4, 32),
        ("q4_1", 4, 32),
        ("Q2K", 4, 32),
        ("Q3K", 4, 32),
        ("Q5K", 4, 32),
        ("Q5_0", 4, 32),
        ("Q6K", 8, None),
        ("Q8_0", 8, None),
        ("q8k", 8, None),
        ("HQQ4", 4, 64),
        ("hqq3", 4, 64),
        ("HQQ8", 8, None),
        ("FP8", 8, None),
        ("afq4", 4, 64),
    ],
)
def test_parse_isq_maps_to_the_nearest_supported_type(value, bits, group):
    spec = isq.parse_isq(value, None)
    assert (spec.bits, spec.group_size, spec.quantize_vision) == (bits, group, False)


def test_parse_isq_says_which_type_a_foreign_name_becomes(caplog):
    with caplog.at_level(logging.INFO, logger="caldera.worker.isq"):
        isq.parse_isq("Q4K", None)
    assert "Q4K" in caplog.text and "int4 (group size 32)" in caplog.text


def test_parse_isq_group_size():
    assert isq.parse_isq("4", 64).group_size == 64
    assert isq.parse_isq("Q4K", 128).group_size == 128
    assert isq.parse_isq(8, 64) == isq.IsqSpec(bits=8)  # per channel: the group is ignored
    with pytest.raises(ValueError, match="group size 48"):
        isq.parse_isq("4", 48)


@pytest.mark.parametrize("value", ["3", "int3", "Q9K", "gguf", "", True, 4.0, 16])
def test_parse_isq_rejects_with_the_accepted_values(value):
    with pytest.raises(ValueError, match="accepted values: 4, 8, int4, int8, Q2K"):
        isq.parse_isq(value, None)


def test_parse_isq_none_means_no_quantization():
    assert isq.parse_isq(None, None) is None


# ==== transforms =============================================================================

LM_NAME = "language_model.model.layers.0.self_attn.q_proj"
VISION_NAME = "vision_tower.vision_model.encoder.layers.0.mlp.fc1"


def test_linear_transform_picks_language_model_and_projector():
    transform = isq.make_linear_transform(isq.IsqSpec(bits=4, group_size=32))
    linear = _linear(64, 16, bias=False)
    assert isinstance(transform(LM_NAME, linear), isq.Int4Linear)
    assert isinstance(transform("multi_modal_projector.linear_1", linear), isq.Int4Linear)
    assert transform(VISION_NAME, linear) is linear
    assert transform("language_model.lm_head", linear) is linear


def test_linear_transform_options():
    linear = _linear(64, 16, bias=False)
    vision = isq.make_linear_transform(isq.IsqSpec(bits=8, quantize_vision=True))
    assert isinstance(vision(VISION_NAME, linear), isq.Int8Linear)
    assert isq.make_linear_transform(None)(LM_NAME, linear) is linear

    class ParallelLinear(nn.Linear):  # has its own forward: not ours to replace
        pass

    subclass = ParallelLinear(64, 16)
    assert isq.make_linear_transform(isq.IsqSpec(bits=8))(LM_NAME, subclass) is subclass


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(32, 32))
        self.multi_modal_projector = nn.Sequential(nn.Linear(32, 64), nn.GELU())
        self.language_model = nn.ModuleDict(
            {
                "mlp": nn.Sequential(nn.Linear(64, 256), nn.Linear(256, 64)),
                "lm_head": nn.Linear(64, 100),
            }
        )

    def forward(self, x):
        h = self.multi_modal_projector(self.vision_tower(x))
        return self.language_model["lm_head"](self.language_model["mlp"](h))


def test_quantize_model_swaps_in_place_and_shrinks_the_model():
    torch.manual_seed(0)
    model = _Tiny()
    x = torch.randn(3, 32)
    with torch.no_grad():
        expected = model(x)
    before = isq.model_bytes(model)
    assert isq.quantize_model(model, isq.IsqSpec(bits=8)) is model
    assert type(model.vision_tower[0]) is nn.Linear
    assert type(model.language_model["lm_head"]) is nn.Linear
    assert isinstance(model.multi_modal_projector[0], isq.Int8Linear)
    assert all(isinstance(m, isq.Int8Linear) for m in model.language_model["mlp"])
    after = isq.model_bytes(model)
    quantized_weights = 32 * 64 + 64 * 256 + 256 * 64
    assert before - after == quantized_weights * 3 - (64 + 256 + 64) * 4  # fp32 -> int8 + scales
    with torch.no_grad():
        got = model(x)
    assert ((got - expected).norm() / expected.norm()).item() < 0.02


def test_quantize_model_name_filter():
    model = _Tiny()
    isq.quantize_model(model, isq.IsqSpec(bits=4, group_size=32), lambda name: "mlp.1" in name)
    assert isinstance(model.language_model["mlp"][1], isq.Int4Linear)
    assert type(model.language_model["mlp"][0]) is nn.Linear


def test_model_bytes_counts_shared_tensors_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    model.register_buffer("table", torch.zeros(3, dtype=torch.float16))
    assert isq.model_bytes(model) == 10 * 4 * 4 + 3 * 2


# ==== with the weight loader =================================================================


@pytest.mark.parametrize("value", ["8", "Q4K"])
def test_loader_quantizes_the_language_model_as_weights_arrive(tiny_checkpoint, value):
    from caldera.worker.config import ModelConfig
    from caldera.worker.loader import load_model

    path = tiny_checkpoint("llava-1.5")
    config = ModelConfig.from_model_dir(path)
    load = lambda transform: load_model(  # noqa: E731
        path,
        config,
        dtype=torch.float32,
        device=torch.device("cpu"),
        progress=False,
        linear_transform=transform,
    )
    plain = load(None)
    spec = isq.parse_isq(value, None)
    model = load(isq.make_linear_transform(spec))
    kind = isq.Int8Linear if spec.bits == 8 else isq.Int4Linear
    for name, module in model.named_modules():
        original = plain.get_submodule(name)
        if type(original) is not nn.Linear:
            continue
        if name.startswith("vision_tower") or name.endswith("lm_head"):
            assert type(module) is nn.Linear, name
        else:
            assert isinstance(module, kind), name
            x = torch.randn(3, original.in_features)
            with torch.no_grad():
                expected, got = original(x), module(x)
            assert ((got - expected).norm() / expected.norm()).item() < 0.15, name
    assert isq.model_bytes(model) < isq.model_bytes(plain)
