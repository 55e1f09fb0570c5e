"""Building the C++ CPU attention op: a failed build (here: a compiler that always fails)
leaves a warning and the torch path, with the same results; CALDERA_CPU_KERNELS=0 skips it.
Each case runs in a fresh interpreter with its own build cache."""

from __future__ import annotations

import os
import subprocess
import sys

SCRIPT = """
import logging, random, torch
logging.basicConfig(level=logging.WARNING)
from caldera.kernels import cpu_attention, ops
from caldera.kernels.metadata import AttentionMetadata
from caldera.kernels.reference import paged_attention_reference
print("loaded", cpu_attention.load())
gen = torch.Generator().manual_seed(0)
lens, q_lens = [5, 40, 17], [1, 1, 3]
tables = [[0], [1, 2, 3], [4, 5]]
meta = AttentionMetadata.build(q_lens, lens, tables, 16)
kc = torch.randn(6, 16, 2, 64, generator=gen); vc = torch.randn(6, 16, 2, 64, generator=gen)
q = torch.randn(sum(q_lens), 4, 64, generator=gen)
out = ops.paged_attention(q, kc, vc, meta, 0.125)
ref = paged_attention_reference(q, kc, vc, meta.query_start_loc_host, meta.seq_lens_host,
                                meta.block_tables, 0.125)
torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
print("ok")
"""


def _run(tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
        env={**os.environ, "CALDERA_CACHE": str(tmp_path), **env},
    )


def test_failed_build_falls_back_to_torch(tmp_path):
    done = _run(tmp_path, CXX="false")
    assert "loaded False" in done.stdout and "ok" in done.stdout
    assert "could not be built" in done.stderr and "torch path" in done.stderr


def test_turned_off(tmp_path):
    done = _run(tmp_path, CALDERA_CPU_KERNELS="0")
    assert "loaded False" in done.stdout and "ok" in done.stdout
    assert "could not be built" not in done.stderr


def test_a_lock_left_by_a_killed_load_does_not_block(tmp_path):
    """torch's build lock file, left behind by a process killed while loading the op, would
    make every later load wait forever."""
    first = _run(tmp_path)  # builds into the cache (or fails to where there is no compiler)
    loaded = "loaded True" in first.stdout
    (build,) = (tmp_path / "kernels").iterdir()
    (build / "lock").touch()
    again = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=120,
        env={**os.environ, "CALDERA_CACHE": str(tmp_path)})
    assert ("loaded True" in again.stdout) == loaded and "ok" in again.stdout
