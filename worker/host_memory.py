"""Host-memory tuning for CPU inference: allocator thresholds and huge pages for the KV cache.

glibc serves large allocations (the step's activations: a 4,096-token chunk through a 1,536-wide
MLP is 25 MB) with fresh ``mmap`` pages and gives them back on free, so every step pays a page
fault per 4 KiB of activations: about a tenth of a prefill-heavy step on CPU. Raising the mmap
and trim thresholds keeps freed memory in the heap for the next step. The process then holds
on to its peak working set, as an inference worker does anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import mmap
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


_HUGE_PAGE = 2 << 20


def zeros_in_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor in a fresh anonymous mapping advised for 2 MiB transparent huge pages.

    For the KV cache: decode attention reads blocks scattered over gigabytes, and with 4 KiB
    pages nearly every block costs a TLB miss whose page-table walk itself misses the caches.
    The mapping is fresh (never recycled heap pages, which would stay 4 KiB), its tensor
    starts on a 2 MiB boundary, and its pages are faulted in before it is returned. Best
    effort: off Linux, or where madvise is unavailable, it is an ordinary zeroed tensor."""
    count = math.prod(shape)
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if (not sys.platform.startswith("linux") or nbytes < 2 * _HUGE_PAGE
            or not hasattr(mmap, "MADV_HUGEPAGE")):
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP off: ordinary pages
        region.madvise(mmap.MADV_HUGEPAGE)
    # The tensor keeps the mapping alive (it holds the buffer); it is unmapped when freed.
    base = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    offset = (-base) % _HUGE_PAGE
    tensor = torch.frombuffer(region, dtype=dtype, count=count, offset=offset).view(shape)
    # Fault every page in now (as torch.zeros would), not inside the steps that first write
    # there; this also claims the memory up front.
    return tensor.zero_()
