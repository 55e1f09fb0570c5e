"""Linears with their weights pre-packed for oneDNN, for CPU inference.

``F.linear`` on CPU hands the weight to the BLAS in its plain row-major layout, and the BLAS
repacks it into its blocked layout on every call; oneDNN can take the weight packed once at
load time. On the bench model (float32, one thread) that makes the layer GEMMs 15-20% faster
and the ``lm_head`` GEMM of a 64-request decode step 1.6x faster (a 32k x 512 weight no longer
repacked per step). The result differs from ``F.linear`` only by float round-off.

Applied by the worker after loading, to the plain ``nn.Linear`` modules of a CPU model in
float32 or bfloat16 (ISQ's quantized linears keep their own kernels). ``CALDERA_CPU_PACKED_LINEAR=0``
turns it off.
"""

from __future__ import annotations

import functools
import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` held in oneDNN's layout (an opaque CPU tensor)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    @property
    def packed_bytes(self) -> int:
        return self.packed_weight.numel() * self.packed_weight.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [],
                                                  "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"


def enabled() -> bool:
    return os.environ.get("CALDERA_CPU_PACKED_LINEAR", "1").lower() not in ("0", "false", "no",
                                                                             "off")


@functools.cache
def supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and this CPU can pack ``dtype`` (oneDNN's bfloat16 path needs
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT: asked of the op itself, once)."""
    if not (dtype in _PACKABLE_DTYPES and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype))
    except RuntimeError as exc:
        logger.info("oneDNN cannot pack %s linears on this CPU (%s)", dtype, exc)
        return False
    return True


def pack_linears(model: nn.Module, dtype: torch.dtype) -> int:
    """Replaces the model's plain CPU ``nn.Linear`` modules by ``PackedLinear``, in place;
    returns how many were packed (0 when off or unsupported)."""
    if not enabled() or not supported(dtype):
        return 0
    targets = [
        name for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.device.type == "cpu"
        and module.weight.dtype == dtype
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, PackedLinear(getattr(parent, child)))
    return len(targets)
