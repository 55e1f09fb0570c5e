"""keep_freed_memory: applied on Linux/glibc (in a fresh interpreter, since it is process-wide),
and off when CALDERA_KEEP_FREED_MEMORY=0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = "from caldera.worker.host_memory import keep_freed_memory; print(keep_freed_memory())"


def _applied(**env: str) -> bool:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          check=True, env={**os.environ, **env})
    return done.stdout.split()[-1] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tuning")
def test_applied_on_glibc_and_can_be_turned_off():
    assert _applied()
    assert not _applied(CALDERA_KEEP_FREED_MEMORY="0")


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[")[1].split("]")[0]


def _anon_huge_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages")
def test_kv_cache_memory_in_huge_pages():
    import torch

    from caldera.worker.host_memory import keep_freed_memory, zeros_in_huge_pages

    keep_freed_memory()  # as in the worker: recycled heap pages must not be used for it
    before = _anon_huge_kib()
    tensor = zeros_in_huge_pages((16, 1024, 1024), torch.float32)  # 64 MiB
    assert tensor.shape == (16, 1024, 1024) and not tensor.any()
    tensor.fill_(1.0)
    # Best effort by the kernel (it needs free 2 MiB pages): most of it here; at least some.
    assert _anon_huge_kib() - before >= 2 * 1024
    assert float(tensor.sum()) == 16 * 1024 * 1024
