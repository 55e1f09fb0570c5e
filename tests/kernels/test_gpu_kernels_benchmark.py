"""The GPU kernel benchmark's device-independent parts: it imports, its byte and FLOP counts
are right, its table renders, and without CUDA it exits with a message instead of failing."""

from __future__ import annotations

import pytest
import torch

from caldera.benchmarks import gpu_kernels
from caldera.kernels.metadata import AttentionMetadata


def test_exits_with_a_message_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_kernels.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_attention_counts():
    # two decodes over 10 and 6 tokens, 2 KV heads of 4, fp16: K and V once each
    assert gpu_kernels.attention_kv_bytes([10, 6], 2, 4, 2) == 2 * 16 * 2 * 4 * 2
    # a 3-token chunk after 2 cached tokens sees 3 + 4 + 5 positions; fresh 2 tokens see 1 + 2
    assert gpu_kernels.attention_flops([3, 2], [5, 2], 1, 1) == 4 * (12 + 3)


def test_gemm_weight_bytes():
    assert gpu_kernels.gemm_weight_bytes("fp16", 4096, 4096) == 2 * 4096 * 4096
    assert gpu_kernels.gemm_weight_bytes("int8", 4096, 8) == 4096 * 8 + 16
    assert gpu_kernels.gemm_weight_bytes("int4", 4096, 8, 128) == 4096 * 8 // 2 + 4 * 32 * 8


def test_decode_batch_is_a_valid_interleaved_layout():
    query_lens, seq_lens, tables = gpu_kernels.decode_batch(3, 40)
    assert query_lens == [1, 1, 1] and seq_lens == [41, 41, 41]
    blocks = [b for t in tables for b in t]
    assert sorted(blocks) == list(range(9))  # 3 blocks each, none shared
    AttentionMetadata.build(query_lens, seq_lens, tables, 16)


def test_table_marks_rows_below_target():
    rows = [
        gpu_kernels.Row("gemm", "int4 M=1", 3.0, 2900.0, "GB/s", ratio=3.4, target=3.0),
        gpu_kernels.Row("gemm", "int8 M=1", 7.0, 2400.0, "GB/s", ratio=1.5, target=1.7),
        gpu_kernels.Row("copy", "1 GiB d2d", 700.0, 3000.0, "GB/s"),
    ]
    table = gpu_kernels.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["section", "case", "time", "us", "value", "unit", "ratio", "target"]
    assert lines[2].rstrip().endswith("ok")
    assert lines[3].rstrip().endswith("below 1.7")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_quick_run_on_cuda(capsys):
    assert gpu_kernels.main(["--quick"]) == 0
    assert "check int4 gemm: ok" in capsys.readouterr().out


TINY = gpu_kernels.Cases(
    heads=(("tiny-gqa", 4, 2, 64),),
    check_lens=((1, 40), (9, 20)),
    decode=((2, 48),),
    prefill=((24, 40),),
    gemm_shapes=((128, 64),),
    gemm_rows=(1, 16),
    copy_bytes=1 << 16,
    kv_write=(32, 2, 64),
)


def test_the_whole_run_on_tiny_cases(monkeypatch, device):
    # Every check and measurement's glue (the split kernel is called directly, so on CPU this
    # needs the interpreter); the timer runs each case once and reports 10 us.
    def fake_time(fn):
        fn()
        return 10.0

    monkeypatch.setattr(gpu_kernels, "_time_us", fake_time)
    rows = gpu_kernels.run(torch.device(device), TINY)
    sections = [r.section for r in rows]
    assert sections == ["copy"] + ["attention"] * 2 + ["kv write"] + ["gemm"] * 6
    assert rows[0].value == 2 * (1 << 16) / 10 / 1e3
    int4_m1 = next(r for r in rows if r.case.startswith("int4 M=1 "))
    assert int4_m1.ratio == 1.0 and int4_m1.target == 3.0
    gpu_kernels.format_table(rows)
