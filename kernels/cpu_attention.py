"""The C++ CPU paged-attention op (``csrc/cpu_attention.cpp``), built on first use.

The op reads each request's KV blocks where they lie, so decode attention on CPU costs one pass
over the context instead of a gather copy plus a masked SDPA. It is compiled with
``torch.utils.cpp_extension`` (a C++ compiler and ninja) the first time a CPU process needs it
and cached under ``$CALDERA_CACHE/kernels`` (default ``~/.cache/caldera/kernels``), keyed by the
source, torch's version and this CPU's instruction-set flags, since it is built for the host CPU.

``CALDERA_CPU_KERNELS=0`` turns it off. When it cannot be built (no compiler), a warning says
why once and ``caldera.kernels.ops`` keeps its pure-torch path: slower, same results.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from caldera.kernels.metadata import AttentionMetadata

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
_FLAGS = ["-O3", "-march=native", "-fopenmp"]


def enabled() -> bool:
    return os.environ.get("CALDERA_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    """This CPU's model and instruction-set flags (the build uses -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    root = Path(os.environ.get("CALDERA_CACHE", Path.home() / ".cache" / "caldera"))
    key = hashlib.sha256(
        b"\0".join(
            [_SOURCE.read_bytes(), torch.__version__.encode(), _cpu_signature().encode(),
             " ".join(_FLAGS).encode()]
        )
    ).hexdigest()[:16]
    return root / "kernels" / f"cpu_attention-{key}"


def _ensure_ninja_on_path() -> None:
    """torch runs ``ninja`` from PATH; the pip package's binary is not there unless the venv
    is activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def load() -> bool:
    """Builds (or loads the cached build of) the op; True when ``torch.ops.caldera_cpu`` has it."""
    if not enabled():
        return False
    try:
        import fcntl

        from torch.utils import cpp_extension

        _ensure_ninja_on_path()
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if not any(directory.glob("*.so")):
            logger.info("compiling the C++ CPU attention op for this CPU (once; about 10-30 s) "
                        "into %s", directory)
        # torch guards the build with a lock file that a process killed mid-load leaves
        # behind, and every later load then waits for it forever. Our own lock is released
        # by the kernel when its holder dies; holding it, any torch lock file is such a
        # leftover and goes.
        with open(directory / ".caldera-load.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            cpp_extension.load(
                name="caldera_cpu_attention",
                sources=[str(_SOURCE)],
                extra_cflags=_FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
    except Exception as exc:  # no compiler, no ninja, a failed build: keep the torch path
        logger.warning(
            "the C++ CPU attention op could not be built (%s: %s); using the slower torch "
            "path. Install a C++ compiler and ninja, or set CALDERA_CPU_KERNELS=0 to silence "
            "this.", type(exc).__name__, str(exc).strip().splitlines()[-1] if str(exc) else "",
        )
        return False
    return True


@dataclass(frozen=True)
class RowPlan:
    """The query rows of one step the op attends: those of requests with at most
    ``max_query_len`` new tokens. Row i belongs to request ``row_reqs[i]`` and sees its
    positions below ``row_ctx[i]`` (within the sliding window, if any)."""

    reqs: list[int]  # the requests covered
    rows: torch.Tensor  # [M] int64
    row_reqs: torch.Tensor  # [M] int32
    row_ctx: torch.Tensor  # [M] int32


def row_plan(metadata: AttentionMetadata, max_query_len: int) -> RowPlan:
    """The step's plan, built once and kept in ``metadata.plans`` for the other layers."""
    key = f"cpu_attention_rows:{max_query_len}"
    plan = metadata.plans.get(key)
    if plan is None:
        starts, seq_lens = metadata.query_start_loc_host, metadata.seq_lens_host
        reqs, rows, row_reqs, row_ctx = [], [], [], []
        for r in range(metadata.num_reqs):
            q_len = starts[r + 1] - starts[r]
            if 0 < q_len <= max_query_len:
                reqs.append(r)
                rows.extend(range(starts[r], starts[r + 1]))
                row_reqs.extend([r] * q_len)
                row_ctx.extend(range(seq_lens[r] - q_len + 1, seq_lens[r] + 1))
        plan = RowPlan(
            reqs,
            torch.tensor(rows, dtype=torch.int64),
            torch.tensor(row_reqs, dtype=torch.int32),
            torch.tensor(row_ctx, dtype=torch.int32),
        )
        metadata.plans[key] = plan
    return plan


def paged_attention_rows(
    out: torch.Tensor,  # [T, H, D], written at the plan's rows
    query: torch.Tensor,  # [T, H, D]
    key_cache: torch.Tensor,  # [N, B, Hkv, D]
    value_cache: torch.Tensor,  # [N, B, Hkv, D]
    metadata: AttentionMetadata,
    plan: RowPlan,
    scale: float,
) -> None:
    """Attention of the query rows of ``plan``."""
    torch.ops.caldera_cpu.paged_attention_rows(
        out,
        query.contiguous(),
        key_cache,
        value_cache,
        metadata.block_tables,
        plan.rows,
        plan.row_reqs,
        plan.row_ctx,
        scale,
        metadata.sliding_window or 0,
    )
