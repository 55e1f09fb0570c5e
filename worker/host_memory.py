"""Host-memory tuning for CPU inference: allocator thresholds and huge pages for the KV cache.

glibc serves large allocations (the step's activations: a 4,096-token chunk through a 1,536-wide
MLP is 25 MB) with fresh ``mmap`` pages and gives them back on free, so every step pays a page
fault per 4 KiB of activations: about a tenth of a prefill-heavy step on CPU. Raising the mmap
and trim thresholds keeps freed memory in the heap for the next step. The process then holds
on to its peak working set, as an inference worker does anyway.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Makes glibc reuse freed large blocks instead of unmapping them; True when applied.

    Skipped off Linux/glibc and when ``CALDERA_KEEP_FREED_MEMORY=0``."""
    if os.environ.get("CALDERA_KEEP_FREED_MEMORY", "1").lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    # glibc caps the mmap threshold (32 MiB on 64-bit builds before 2.26); try 1 GiB first.
    applied = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (1 << 30, 32 << 20))
    applied = applied and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    logger.debug("glibc mmap/trim thresholds raised: %s", applied)
    return applied


_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20


def zeros_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose memory is asked to be backed by 2 MiB transparent huge pages.

    For the KV cache: decode attention reads blocks scattered over gigabytes, and with 4 KiB
    pages nearly every block costs a TLB miss whose page-table walk itself misses the caches.
    Best effort: where madvise or THP is unavailable it is an ordinary zeroed tensor."""
    tensor = torch.empty(shape, dtype=dtype)
    nbytes = tensor.numel() * tensor.element_size()
    if sys.platform.startswith("linux") and nbytes >= 2 * _HUGE_PAGE:
        start = -(-tensor.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (tensor.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        try:
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
        except (OSError, AttributeError):
            pass
    return tensor.zero_()
