"""GPU kernel benchmark: checks every Triton kernel against its torch reference, then times it.

    python -m caldera.benchmarks.gpu_kernels [--quick]
    python -m caldera.benchmarks.gpu_kernels --cpu-paths   # the torch CPU paths, no GPU needed

* copy: device-to-device copy bandwidth (read + write), the yardstick for memory-bound kernels
* attention decode: KV bytes read per second, as a share of the copy bandwidth
  (LLaVA-1.5 / Vicuna heads 32 x 128 and Mistral GQA 32 / 8 x 128, fp16, block size 16)
* attention prefill: a fresh prompt and a chunk after a cached prefix (TFLOP/s and KV GB/s)
* KV write: bytes moved per second
* int8 / int4 (group 128) weight-only GEMM against torch fp16 ``F.linear`` at M = 1, 16, 64,
  256 on LLaMA-7B projection shapes (K x N = in x out features)

Timings are medians of ``triton.testing.do_bench`` (L2 flushed before each run). Targets
(H100): decode >= 80% of copy bandwidth at 2k+ context; int4 >= 3x fp16 at M = 1 and >= 2x at
M = 16; int8 >= 1.7x at M = 1. Exits with a message when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable

import torch

from caldera.kernels.metadata import AttentionMetadata

DECODE_TARGET = 0.80
GEMM_TARGETS = {("int4", 1): 3.0, ("int4", 16): 2.0, ("int8", 1): 1.7}


@dataclasses.dataclass(frozen=True)
class Cases:
    """What to check and time (sizes only: the same code runs a smoke test on tiny ones)."""

    heads: tuple[tuple[str, int, int, int], ...] = (  # (name, query heads, KV heads, head size)
        ("mha-32x128", 32, 32, 128),
        ("gqa-32/8x128", 32, 8, 128),
    )
    check_lens: tuple[tuple[int, int], ...] = ((1, 2050), (1, 700), (37, 100), (300, 300))
    decode: tuple[tuple[int, int], ...] = ((1, 8192), (8, 2048), (32, 2048), (64, 4096))
    prefill: tuple[tuple[int, int], ...] = ((2048, 2048), (512, 2048))  # (new tokens, context)
    gemm_shapes: tuple[tuple[int, int], ...] = ((4096, 4096), (4096, 11008), (11008, 4096))
    gemm_rows: tuple[int, ...] = (1, 16, 64, 256)
    copy_bytes: int = 1 << 30
    kv_write: tuple[int, int, int] = (4096, 32, 128)  # tokens, KV heads, head size


FULL = Cases()
QUICK = dataclasses.replace(FULL, decode=FULL.decode[:2], gemm_shapes=FULL.gemm_shapes[:1])


# ==== arithmetic (device independent) ========================================================


def attention_kv_bytes(
    seq_lens: list[int], num_kv_heads: int, head_size: int, itemsize: int
) -> int:
    """Bytes of K and V a pass over every request's context reads."""
    return 2 * sum(seq_lens) * num_kv_heads * head_size * itemsize


def attention_flops(
    query_lens: list[int], seq_lens: list[int], num_heads: int, head_size: int
) -> int:
    """Multiply-adds x 2 of QK^T and PV over the visible (causal) positions."""
    visible = 0
    for q, s in zip(query_lens, seq_lens):
        first = s - q + 1  # positions the first new token sees
        visible += q * first + q * (q - 1) // 2
    return 4 * visible * num_heads * head_size


def gemm_weight_bytes(kind: str, k: int, n: int, group_size: int = 128) -> int:
    """Weight bytes a GEMM streams: fp16 2 per element, int8 1 + fp16 scales, int4 half a byte
    + fp16 scale and zero per group."""
    if kind == "fp16":
        return 2 * k * n
    if kind == "int8":
        return k * n + 2 * n
    groups = -(-k // group_size)
    return groups * group_size * n // 2 + 4 * groups * n


@dataclasses.dataclass
class Row:
    section: str
    case: str
    time_us: float
    value: float  # the section's figure of merit (see unit)
    unit: str
    ratio: float | None = None  # against the section's baseline
    target: float | None = None  # the ratio it should reach

    @property
    def verdict(self) -> str:
        if self.target is None or self.ratio is None:
            return ""
        return "ok" if self.ratio >= self.target else f"below {self.target:g}"


def format_table(rows: list[Row]) -> str:
    header = ("section", "case", "time us", "value", "unit", "ratio", "target")
    lines = [
        (
            r.section,
            r.case,
            f"{r.time_us:.1f}",
            f"{r.value:.1f}",
            r.unit,
            "" if r.ratio is None else f"{r.ratio:.2f}",
            r.verdict,
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt.format(*header), rule, *(fmt.format(*line) for line in lines)])


def decode_batch(
    batch: int, context: int, block_size: int = 16
) -> tuple[list[int], list[int], list[list[int]]]:
    """(query lens, seq lens, block tables) of ``batch`` decodes over ``context`` tokens, each
    request's blocks interleaved with the others' (no request owns a contiguous range)."""
    per_request = -(-(context + 1) // block_size)
    tables = [[b * batch + r for b in range(per_request)] for r in range(batch)]
    return [1] * batch, [context + 1] * batch, tables


# ==== GPU measurements =======================================================================


def _time_us(fn: Callable[[], object]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _check(name: str, got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    error = ((got.float().cpu() - expected.float().cpu()).abs().max()).item()
    scale = expected.float().abs().max().item() or 1.0
    if not error / scale <= tolerance:
        raise SystemExit(f"{name}: Triton differs from the reference by {error / scale:.2e}")
    print(f"  check {name}: ok (max relative error {error / scale:.1e})")


def copy_bandwidth(device: torch.device, cases: Cases) -> Row:
    src = torch.empty(cases.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _time_us(lambda: dst.copy_(src))
    return Row("copy", f"{cases.copy_bytes >> 20} MiB d2d", t, 2 * src.numel() / t / 1e3, "GB/s")


def _paged_inputs(query_lens, seq_lens, tables, heads, device, block_size=16):
    num_heads, num_kv_heads, head_size = heads
    num_blocks = max(b for t in tables for b in t) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, dtype=torch.float16, device=device)
    value_cache = torch.randn(shape, dtype=torch.float16, device=device)
    query = torch.randn(sum(query_lens), num_heads, head_size, dtype=torch.float16, device=device)
    metadata = AttentionMetadata.build(query_lens, seq_lens, tables, block_size, device=device)
    return query, key_cache, value_cache, metadata


def check_kernels(device: torch.device, cases: Cases) -> None:
    """Every kernel once against its reference, on a mixed batch / small GEMMs."""
    from caldera.kernels import ops, quant_reference, reference, triton_attention
    from caldera.worker.isq import quantize_int4, quantize_int8

    query_lens = [q for q, _ in cases.check_lens]
    seq_lens = [s for _, s in cases.check_lens]
    tables, used = [], 0
    for s in seq_lens:
        n = -(-s // 16)
        tables.append(list(range(used, used + n))[::-1])
        used += n
    for name, *heads in cases.heads:
        q, kc, vc, md = _paged_inputs(query_lens, seq_lens, tables, heads, device)
        expected = reference.paged_attention_reference(
            q.cpu(),
            kc.cpu(),
            vc.cpu(),
            md.query_start_loc_host,
            md.seq_lens_host,
            md.block_tables.cpu(),
            0.088,
        )
        _check(f"attention {name}", ops.paged_attention(q, kc, vc, md, 0.088), expected, 5e-3)
        split = triton_attention.paged_attention_split(q, kc, vc, md, 0.088, num_splits=8)
        _check(f"attention split {name}", split, expected, 5e-3)

    _, _, num_kv_heads, head_size = cases.heads[-1]
    key = torch.randn(64, num_kv_heads, head_size, dtype=torch.float16, device=device)
    slots = torch.randperm(256, device=device)[:64]
    slots[::5] = -1
    shape = (16, 16, num_kv_heads, head_size)
    caches = [torch.zeros(shape, dtype=torch.float16, device=device) for _ in range(4)]
    ops.write_kv(key, -key, caches[0], caches[1], slots)
    reference.write_kv_reference(key, -key, caches[2], caches[3], slots)
    _check("kv write", torch.stack(caches[:2]), torch.stack(caches[2:]), 0.0)

    k, n = cases.gemm_shapes[0]
    weight = torch.randn(n, k, dtype=torch.float16, device=device) * 0.02
    x = torch.randn(33, k, dtype=torch.float16, device=device)
    q8 = quantize_int8(weight)
    q4 = quantize_int4(weight, 128)
    _check(
        "int8 gemm", ops.int8_linear(x, *q8), quant_reference.int8_linear_reference(x, *q8), 2e-3
    )
    _check(
        "int4 gemm",
        ops.int4_linear(x, *q4, 128),
        quant_reference.int4_linear_reference(x, *q4, 128),
        2e-3,
    )


def attention_rows(device: torch.device, copy_gbps: float, cases: Cases) -> list[Row]:
    from caldera.kernels import ops, triton_attention

    sms = (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 1
    )
    rows = []
    for name, *heads in cases.heads:
        for batch, context in cases.decode:
            query_lens, seq_lens, tables = decode_batch(batch, context)
            q, kc, vc, md = _paged_inputs(query_lens, seq_lens, tables, heads, device)
            t = _time_us(lambda q=q, kc=kc, vc=vc, md=md: ops.paged_attention(q, kc, vc, md, 0.088))
            gbps = attention_kv_bytes(seq_lens, heads[1], heads[2], 2) / t / 1e3
            target = DECODE_TARGET if context >= 2048 else None
            splits = triton_attention.num_splits_for(md, heads[1], sms)
            case = f"{name} decode b{batch} ctx{context} splits {splits}"
            rows.append(Row("attention", case, t, gbps, "GB/s", gbps / copy_gbps, target))
        for new_tokens, context in cases.prefill:
            query_lens, seq_lens = [new_tokens], [context]
            tables = [list(range(-(-context // 16)))]
            q, kc, vc, md = _paged_inputs(query_lens, seq_lens, tables, heads, device)
            t = _time_us(lambda q=q, kc=kc, vc=vc, md=md: ops.paged_attention(q, kc, vc, md, 0.088))
            tflops = attention_flops(query_lens, seq_lens, heads[0], heads[2]) / t / 1e6
            gbps = attention_kv_bytes(seq_lens, heads[1], heads[2], 2) / t / 1e3
            case = f"{name} prefill q{query_lens[0]} ctx{seq_lens[0]} ({gbps:.0f} GB/s KV)"
            rows.append(Row("attention", case, t, tflops, "TFLOP/s"))
    return rows


def kv_write_row(device: torch.device, cases: Cases) -> Row:
    from caldera.kernels import ops

    tokens, heads, head_size = cases.kv_write
    key = torch.randn(tokens, heads, head_size, dtype=torch.float16, device=device)
    shape = (-(-tokens // 16) * 2, 16, heads, head_size)  # half the slots used, scattered
    cache = [torch.empty(shape, dtype=torch.float16, device=device) for _ in range(2)]
    slots = torch.randperm(shape[0] * 16, device=device)[:tokens]
    t = _time_us(lambda: ops.write_kv(key, key, cache[0], cache[1], slots))
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read and written
    return Row("kv write", f"{tokens} tokens x {heads}x{head_size}", t, moved / t / 1e3, "GB/s")


def _gemm_shape_rows(
    device: torch.device,
    k: int,
    n: int,
    row_counts,
    dtype: torch.dtype = torch.float16,
    timer: Callable[[Callable[[], object]], float] | None = None,
    targets: dict | None = GEMM_TARGETS,
) -> list[Row]:
    """int8 and int4 linears against ``F.linear`` in ``dtype``, on one weight shape."""
    import torch.nn.functional as F

    from caldera.kernels import ops
    from caldera.worker.isq import quantize_int4, quantize_int8

    timer = timer or _time_us
    weight = (torch.randn(n, k, device=device) * 0.02).to(dtype)
    q8 = quantize_int8(weight)
    q4 = quantize_int4(weight, 128)
    base_name = str(dtype).removeprefix("torch.")
    rows = []
    for m in row_counts:
        x = torch.randn(m, k, device=device).to(dtype)
        runs = {
            "fp16": lambda x=x: F.linear(x, weight),
            "int8": lambda x=x: ops.int8_linear(x, *q8),
            "int4": lambda x=x: ops.int4_linear(x, *q4, 128),
        }
        times = {kind: timer(run) for kind, run in runs.items()}
        for kind, t in times.items():
            moved = weight.numel() * weight.element_size() if kind == "fp16" else None
            gbps = (moved or gemm_weight_bytes(kind, k, n)) / t / 1e3
            ratio = None if kind == "fp16" else times["fp16"] / t
            target = (targets or {}).get((kind, m))
            name = base_name if kind == "fp16" else kind
            rows.append(Row("gemm", f"{name} M={m} {k}x{n}", t, gbps, "GB/s", ratio, target))
    return rows


def gemm_rows(device: torch.device, cases: Cases) -> list[Row]:
    return [
        row for k, n in cases.gemm_shapes for row in _gemm_shape_rows(device, k, n, cases.gemm_rows)
    ]


# ==== CPU paths (the torch side of each dispatch point) ======================================


def _cpu_time_us(fn: Callable[[], object], repeats: int = 7) -> float:
    import time

    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e6


def cpu_rows() -> list[Row]:
    """The CPU attention path (with the C++ op, and its pure-torch fallback) against the
    reference, quantized CPU linears against float32."""
    import random

    from caldera.kernels import cpu_attention, ops, reference

    rng = random.Random(0)
    rows = []
    attention_cases = {
        "tiny decode x8 (4/2 heads x 16)": (
            [1] * 8,
            [rng.randint(10, 60) for _ in range(8)],
            (4, 2, 16),
        ),
        "decode x16 ctx 100-1000 (32x128)": (
            [1] * 16,
            [rng.randint(100, 1000) for _ in range(16)],
            (32, 32, 128),
        ),
        "prefill 512 (32x128)": ([512], [512], (32, 32, 128)),
        "mixed 8 decodes + chunk 128 (32/8x128)": (
            [1] * 8 + [128],
            [rng.randint(100, 1000) for _ in range(8)] + [428],
            (32, 8, 128),
        ),
    }
    for case, (query_lens, seq_lens, heads) in attention_cases.items():
        tables, used = [], 0
        for s in seq_lens:
            n = -(-s // 16)
            tables.append(rng.sample(range(used, used + n), n))
            used += n
        q, kc, vc, md = _paged_inputs(query_lens, seq_lens, tables, heads, torch.device("cpu"))
        q, kc, vc = q.float(), kc.float(), vc.float()
        base = _cpu_time_us(
            lambda q=q, kc=kc, vc=vc, md=md: reference.paged_attention_reference(
                q, kc, vc, md.query_start_loc_host, md.seq_lens_host, md.block_tables, 0.1
            )
        )
        t = _cpu_time_us(lambda q=q, kc=kc, vc=vc, md=md: ops.paged_attention(q, kc, vc, md, 0.1))
        rows.append(Row("cpu attention", case, t, base / 1e3, "ref ms", base / t))
        if cpu_attention.load():  # the same without the C++ op: the pure-torch fallback
            t = _cpu_time_us(
                lambda q=q, kc=kc, vc=vc, md=md: ops.paged_attention_cpu(
                    q, kc, vc, md, 0.1, native=False
                )
            )
            rows.append(Row("cpu attn, torch", case, t, base / 1e3, "ref ms", base / t))
    for k, n in ((4096, 4096), (4096, 11008)):
        rows += _gemm_shape_rows(
            torch.device("cpu"), k, n, (1, 16, 128), torch.float32, _cpu_time_us, targets=None
        )
    return rows


def run(device: torch.device, cases: Cases) -> list[Row]:
    torch.manual_seed(0)
    check_kernels(device, cases)
    copy = copy_bandwidth(device, cases)
    rows = [copy, *attention_rows(device, copy.value, cases), kv_write_row(device, cases)]
    return rows + gemm_rows(device, cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    parser.add_argument(
        "--cpu-paths", action="store_true", help="time the torch CPU paths instead (no GPU)"
    )
    args = parser.parse_args(argv)
    if args.cpu_paths:
        print(f"CPU paths, {torch.get_num_threads()} thread(s); ratio = baseline / time")
        print(format_table(cpu_rows()))
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu_kernels: no CUDA device found. This benchmark times the Triton kernels on a "
            "GPU; on CPU the kernels are checked by the test suite under TRITON_INTERPRET=1.",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}")
    rows = run(device, QUICK if args.quick else FULL)
    print(format_table(rows))
    missed = [r for r in rows if r.verdict.startswith("below")]
    print(f"{len(missed)} case(s) below target" if missed else "all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
