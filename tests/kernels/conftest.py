"""Kernel tests run every Triton kernel: compiled on CUDA tensors when a GPU is present, else
under the Triton interpreter on CPU tensors.

Triton decides interpreted-or-compiled when a function is decorated, that is when its module
is imported, so the switch is set here, before any test module imports a kernel. (``ops``
imports the kernel modules only on first use with a CUDA tensor; any imported earlier are
reloaded.) Triton's own library functions are decorated when ``triton`` is first imported: if
that happened earlier in this process in compiled mode (a test elsewhere importing
transformers pulls triton in), the CPU cases cannot run here, and
``test_interpreter_process.py`` runs them in a fresh process instead.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from caldera.kernels.metadata import AttentionMetadata
from caldera.kernels.reference import paged_attention_reference

KERNEL_MODULES = (
    "caldera.kernels.triton_attention",
    "caldera.kernels.triton_kv_write",
    "caldera.kernels.triton_quant_gemm",
)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_compiled_already() -> bool:
    language = sys.modules.get("triton.language")
    if language is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(language.zeros, InterpretedFunction)


# Whether the interpreter cases run in this process, or in a fresh one.
INTERPRETER_HERE = INTERPRETED and not _triton_compiled_already()
INTERPRETER_ELSEWHERE = INTERPRETED and not INTERPRETER_HERE


def _patch_interpreter_bf16() -> None:
    """The interpreter stores bfloat16 as raw uint16 bits, and two of its ops forget it:
    ``tl.dot`` multiplies the bits, and integer <-> bf16 casts convert the bits. Route both
    through float32 (exact), so bf16 kernels can be checked on CPU."""
    from triton import language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    original_cast = builder.cast_impl
    if getattr(original, "widens_bf16", False):
        return

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        src_type, dst = src.dtype.scalar, dst_type.scalar
        if (dst == tl.bfloat16 and src_type.is_int()) or (src_type == tl.bfloat16 and dst.is_int()):
            return original_cast(self, original_cast(self, src, tl.float32), dst_type)
        return original_cast(self, src, dst_type)

    create_dot.widens_bf16 = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl


if INTERPRETER_HERE:
    _patch_interpreter_bf16()
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])

# CPU cases need the interpreter; CUDA cases need a GPU (and then run compiled kernels).
DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETER_HERE,
            reason="kernels are compiled for CUDA"
            if not INTERPRETED
            else "triton was imported compiled: test_interpreter_process runs these",
        ),
    ),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    ),
]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def interpreter_elsewhere() -> bool:
    """True when this process cannot interpret kernels and a fresh one must."""
    return INTERPRETER_ELSEWHERE


# ==== random paged batches ===================================================================


@dataclasses.dataclass
class PagedBatch:
    query: torch.Tensor  # [T, H, D]
    key_cache: torch.Tensor  # [N, B, Hkv, D]
    value_cache: torch.Tensor  # [N, B, Hkv, D]
    metadata: AttentionMetadata

    @property
    def scale(self) -> float:
        return self.query.shape[-1] ** -0.5

    def reference(self) -> torch.Tensor:
        """The torch reference, computed on CPU copies (it builds CPU index tensors)."""
        md = self.metadata
        return paged_attention_reference(
            self.query.cpu(),
            self.key_cache.cpu(),
            self.value_cache.cpu(),
            md.query_start_loc_host,
            md.seq_lens_host,
            md.block_tables.cpu(),
            self.scale,
            md.sliding_window,
        )


def mixed_lengths(rng: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    """(query lens, cached-context lens): decodes over short and multi-block contexts, a fresh
    prefill ending mid-block, prefill chunks after cached prefixes; in random order."""
    requests = [(1, rng.randint(0, 4 * block_size)) for _ in range(3)]
    requests.append((rng.randint(block_size + 1, 3 * block_size - 1), 0))
    requests.append((rng.randint(2, 2 * block_size), rng.randint(1, 3 * block_size)))
    requests.append((rng.randint(2, block_size), rng.randint(1, block_size)))
    rng.shuffle(requests)
    return [q for q, _ in requests], [c for _, c in requests]


def build_batch(
    query_lens: list[int],
    context_lens: list[int],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    sliding_window: int | None = None,
) -> PagedBatch:
    """A batch over a paged cache whose blocks are handed out in shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, context_lens)]
    needed = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(needed) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for n in needed:
        tables.append(order[used : used + n])
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=gen).to(device, dtype)
    value_cache = torch.randn(shape, generator=gen).to(device, dtype)
    query = torch.randn((sum(query_lens), num_heads, head_size), generator=gen).to(device, dtype)
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=device)
    metadata.sliding_window = sliding_window
    return PagedBatch(query, key_cache, value_cache, metadata)


# Absolute tolerances for outputs of magnitude ~1, by dtype.
ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@pytest.fixture
def kit() -> SimpleNamespace:
    """The batch helpers above, for test modules (which cannot import this conftest)."""
    return SimpleNamespace(
        build_batch=build_batch, mixed_lengths=mixed_lengths, atol=ATOL, nan_like=nan_like
    )
