"""In-situ quantization (ISQ): float linears become weight-only int8 / int4 linears at load.

Three layers, each usable alone:

1. Tensor functions: ``quantize_int8`` (symmetric, per output channel) and ``quantize_int4``
   (asymmetric, group-wise along the input features, packed two codes per byte); the layouts
   and dequantization live beside the kernels in ``caldera.kernels.quant_reference``.
2. Modules: ``Int8Linear`` / ``Int4Linear``, built ``from_linear``; forward is one call into
   ``caldera.kernels.ops`` (Triton on CUDA, chunked dequantize + matmul on CPU).
3. Converters: ``make_linear_transform(spec)`` for the weight loader, which calls it on each
   linear right after that layer's weights are loaded (so peak memory stays near the quantized
   size), and ``quantize_model`` to swap the linears of an already built model.

What is quantized: every plain ``nn.Linear`` of the language model and the projector. The
vision tower stays in float unless ``IsqSpec.quantize_vision``; ``lm_head`` always stays in
float (it is the most error-sensitive layer, and may share its weight with the embedding).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from caldera.kernels import ops
from caldera.kernels.quant_reference import (
    INT4_GROUP_SIZES,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
)

logger = logging.getLogger(__name__)

__all__ = [
    "Int4Linear",
    "Int8Linear",
    "IsqSpec",
    "dequantize_int4",
    "dequantize_int8",
    "make_linear_transform",
    "model_bytes",
    "parse_isq",
    "quantize_int4",
    "quantize_int8",
    "quantize_linear",
    "quantize_model",
    "should_quantize",
]

DEFAULT_INT4_GROUP_SIZE = 128
# Float elements handled per step while quantizing, so a large weight never needs a full
# float32 copy next to it.
_QUANTIZE_CHUNK_ELEMENTS = 1 << 24
VISION_MODULE_NAMES = frozenset({"vision_tower", "vision_model"})
UNQUANTIZED_MODULE_NAMES = frozenset({"lm_head"})


# ==== spec ===================================================================================


@dataclasses.dataclass(frozen=True)
class IsqSpec:
    bits: int  # 4 | 8
    group_size: int | None = None  # int4: 32 | 64 | 128; int8 is per channel (None)
    quantize_vision: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"ISQ bits must be 4 or 8, got {self.bits}")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 ISQ is per output channel: group_size must be None")
        if self.bits == 4 and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}")

    def describe(self) -> str:
        return "int8 (per channel)" if self.bits == 8 else f"int4 (group size {self.group_size})"


# Formats named as mistral.rs names them -> (bits of the source format, its block size).
# Each maps to the supported type nearest in bits (a tie goes to int8, the more accurate);
# int4 takes the source's block size as its group size.
_FOREIGN_FORMATS: dict[str, tuple[int, int | None]] = {
    "Q2K": (2, 32),
    "Q3K": (3, 32),
    "Q4_0": (4, 32),
    "Q4_1": (4, 32),
    "Q4K": (4, 32),
    "Q5_0": (5, 32),
    "Q5_1": (5, 32),
    "Q5K": (5, 32),
    "Q6K": (6, None),
    "Q8_0": (8, None),
    "Q8_1": (8, None),
    "Q8K": (8, None),
    "HQQ1": (1, 64),
    "HQQ2": (2, 64),
    "HQQ3": (3, 64),
    "HQQ4": (4, 64),
    "HQQ8": (8, None),
    "AFQ2": (2, 64),
    "AFQ3": (3, 64),
    "AFQ4": (4, 64),
    "AFQ6": (6, None),
    "AFQ8": (8, None),
    "FP8": (8, None),
}
_NATIVE = {"4": 4, "INT4": 4, "8": 8, "INT8": 8}


def _normalise(name: str) -> str:
    return name.strip().upper().replace("_", "").replace("-", "")


_FOREIGN_BY_KEY = {_normalise(name): name for name in _FOREIGN_FORMATS}
ACCEPTED_ISQ_VALUES = ("4", "8", "int4", "int8", *_FOREIGN_FORMATS)


def parse_isq(value: str | int | None, group_size: int | None = None) -> IsqSpec | None:
    """The ISQ spec a user asked for (None: no quantization); ValueError names what is accepted.

    ``4``/``8``/``"int4"``/``"int8"`` are native. mistral.rs names (``"Q4K"``, ``"Q8_0"``,
    ``"HQQ4"``, ... any case) map to the nearest supported type, said in a log line.
    ``group_size`` (int4 only) overrides the default: 128, or the named format's block size.
    """
    if value is None:
        return None
    accepted = ", ".join(ACCEPTED_ISQ_VALUES)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"unsupported ISQ value {value!r}; accepted values: {accepted}")
    key = _normalise(str(value))
    if key in _NATIVE:
        bits, default_group, foreign = _NATIVE[key], DEFAULT_INT4_GROUP_SIZE, None
    elif key in _FOREIGN_BY_KEY:
        foreign = _FOREIGN_BY_KEY[key]
        source_bits, default_group = _FOREIGN_FORMATS[foreign]
        bits = 4 if abs(source_bits - 4) < abs(source_bits - 8) else 8
    else:
        raise ValueError(f"unsupported ISQ value {value!r}; accepted values: {accepted}")

    if bits == 8:
        if group_size is not None:
            logger.info("ISQ int8 is per output channel: group size %d is ignored", group_size)
        spec = IsqSpec(bits=8)
    else:
        group = default_group if group_size is None else group_size
        if group not in INT4_GROUP_SIZES:
            sizes = ", ".join(map(str, INT4_GROUP_SIZES))
            raise ValueError(f"unsupported int4 ISQ group size {group}; accepted: {sizes}")
        spec = IsqSpec(bits=4, group_size=group)
    if foreign is not None:
        logger.info(
            "ISQ %s is not native to Caldera: using %s, the nearest supported type",
            foreign,
            spec.describe(),
        )
    return spec


# ==== tensor functions =======================================================================


def _row_chunks(weight: torch.Tensor, width: int):
    step = max(1, _QUANTIZE_CHUNK_ELEMENTS // max(width, 1))
    for start in range(0, weight.shape[0], step):
        yield start, min(start + step, weight.shape[0])


@torch.no_grad()
def quantize_int8(
    weight: torch.Tensor, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of ``weight [N, K]``.

    Returns ``qweight [N, K] int8`` (-127..127) and ``scales [N]`` in the weight's dtype, with
    ``weight ~ qweight * scales[:, None]``, each element within half a scale step.
    ``reduce_max``, for a weight holding a slice of the input features (a row-parallel shard),
    turns the slice's per-row absolute maxima into the whole rows' (a max over the ranks), so
    the scales are those of the unsplit weight.
    """
    assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
    qweight = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    amax = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start, stop in _row_chunks(weight, weight.shape[1]):
        amax[start:stop] = weight[start:stop].float().abs().amax(dim=1)
    if reduce_max is not None:
        amax = reduce_max(amax)
    for start, stop in _row_chunks(weight, weight.shape[1]):
        rows = weight[start:stop].float()
        row_amax = amax[start:stop]
        scale = torch.where(row_amax > 0, row_amax / 127, torch.ones_like(row_amax))
        scale = scale.to(weight.dtype).float()  # quantize against the scale as stored
        qweight[start:stop] = torch.round(rows / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start:stop] = scale.to(weight.dtype)
    return qweight, scales


@torch.no_grad()
def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 of ``weight [N, K]`` (groups of ``group_size`` along K).

    Returns ``qweight [N, K_pad/2] uint8`` (packed), ``scales`` and ``zeros [N, K_pad/G]`` in the
    weight's dtype, ``K_pad = ceil(K / G) * G`` (the tail is padded with zeros). Each group's
    range is widened to include 0, so the integer zero point is exact: every element is within
    half a scale step of ``(code - zero) * scale``.
    """
    assert weight.dim() == 2, f"weight must be [N, K], got {tuple(weight.shape)}"
    assert group_size in INT4_GROUP_SIZES, f"group size {group_size} not in {INT4_GROUP_SIZES}"
    n, k = weight.shape
    k_pad = -(-k // group_size) * group_size
    groups = k_pad // group_size
    device = weight.device
    qweight = torch.empty((n, k_pad // 2), dtype=torch.uint8, device=device)
    scales = torch.empty((n, groups), dtype=weight.dtype, device=device)
    zeros = torch.empty((n, groups), dtype=weight.dtype, device=device)
    for start, stop in _row_chunks(weight, k_pad):
        rows = F.pad(weight[start:stop].float(), (0, k_pad - k)).view(-1, groups, group_size)
        low = rows.amin(dim=-1).clamp_(max=0)
        high = rows.amax(dim=-1).clamp_(min=0)
        scale = (high - low) / 15
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        scale = scale.to(weight.dtype).float()  # quantize against the scale as stored
        zero = torch.round(-low / scale).clamp_(0, 15)
        codes = torch.round(rows / scale[..., None]).add_(zero[..., None]).clamp_(0, 15)
        qweight[start:stop] = pack_int4(codes.view(-1, k_pad))
        scales[start:stop] = scale.to(weight.dtype)
        zeros[start:stop] = zero.to(weight.dtype)
    return qweight, scales, zeros


# ==== modules ================================================================================


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 per-channel weight: y = x @ (qweight * scales)^T + bias."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer(
            "qweight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device)
        )
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Int8Linear:
        """``reduce_max``: see ``quantize_int8`` (for a shard of the input features)."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device="meta",  # no placeholder storage: peak memory stays at the quantized size
        )
        module.qweight, module.scales = quantize_int8(weight, reduce_max)
        module.bias = None if linear.bias is None else linear.bias.detach()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.qweight, self.scales, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 per channel"
        )


class Int4Linear(nn.Module):
    """``nn.Linear`` with an int4 group-wise weight (layout in ``kernels.quant_reference``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int = DEFAULT_INT4_GROUP_SIZE,
        bias: bool = True,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        assert group_size in INT4_GROUP_SIZES, f"group size {group_size} not in {INT4_GROUP_SIZES}"
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = -(-in_features // group_size)
        shape = (out_features, groups)
        self.register_buffer(
            "qweight",
            torch.zeros((out_features, groups * group_size // 2), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, group_size: int = DEFAULT_INT4_GROUP_SIZE
    ) -> Int4Linear:
        weight = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            group_size=group_size,
            bias=linear.bias is not None,
            dtype=weight.dtype,
            device="meta",
        )
        module.qweight, module.scales, module.zeros = quantize_int4(weight, group_size)
        module.bias = None if linear.bias is None else linear.bias.detach()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int4_linear(x, self.qweight, self.scales, self.zeros, self.group_size, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int4 group size {self.group_size}"
        )


# ==== converters =============================================================================


def should_quantize(name: str, spec: IsqSpec) -> bool:
    """Whether the linear at qualified ``name`` is quantized under ``spec``."""
    parts = name.split(".")
    if parts[-1] in UNQUANTIZED_MODULE_NAMES:
        return False
    if VISION_MODULE_NAMES.intersection(parts):
        return spec.quantize_vision
    return True


def quantize_linear(
    linear: nn.Linear,
    spec: IsqSpec,
    reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """The quantized replacement of ``linear``. ``reduce_max`` marks a linear that holds a
    slice of its layer's input features (a row-parallel shard): int8 scales then span the whole
    rows, and int4 groups must not straddle slices (ValueError otherwise)."""
    if spec.bits == 8:
        return Int8Linear.from_linear(linear, reduce_max)
    if reduce_max is not None and linear.in_features % spec.group_size:
        raise ValueError(
            f"int4 ISQ groups of {spec.group_size} straddle the {linear.in_features} input "
            f"features of a tensor-parallel shard; choose an isq_group_size that divides "
            f"{linear.in_features}"
        )
    return Int4Linear.from_linear(linear, spec.group_size)


def make_linear_transform(spec: IsqSpec | None) -> Callable[..., nn.Module]:
    """``transform(name, linear, reduce_max=None)``: the quantized replacement, or ``linear``
    itself when the name is not quantized (or ``spec`` is None). Only plain ``nn.Linear`` is
    converted: a subclass has its own forward and is returned unchanged. A tensor-parallel
    layer passes its shard with ``reduce_max`` (see ``quantize_linear``)."""

    def transform(
        name: str,
        linear: nn.Linear,
        reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> nn.Module:
        if spec is None or not should_quantize(name, spec):
            return linear
        if type(linear) is not nn.Linear:
            logger.warning(
                "ISQ leaves %s in float: %s is not a plain nn.Linear", name, type(linear).__name__
            )
            return linear
        return quantize_linear(linear, spec, reduce_max)

    return transform


def quantize_model(
    model: nn.Module, spec: IsqSpec, name_filter: Callable[[str], bool] | None = None
) -> nn.Module:
    """Swaps the model's linears for quantized ones, in place; returns the model.

    ``name_filter(qualified_name)`` chooses the linears; by default ``should_quantize``.
    """
    chosen = name_filter or (lambda name: should_quantize(name, spec))
    targets = [
        name
        for name, module in model.named_modules()
        if name and type(module) is nn.Linear and chosen(name)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, quantize_linear(getattr(parent, child), spec))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    # oneDNN-packed weights are opaque tensors held outside the parameters.
    total += sum(getattr(m, "packed_bytes", 0) for m in model.modules())
    return total
