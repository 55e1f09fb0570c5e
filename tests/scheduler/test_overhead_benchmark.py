"""The scheduler-overhead benchmark runs end to end (tiny sizes)."""

from __future__ import annotations

from caldera.benchmarks import scheduler_overhead


def test_benchmark_runs(capsys):
    scheduler_overhead.main(
        ["--num-requests", "8", "--steps", "20", "--min-len", "20", "--max-len", "60"]
    )
    out = capsys.readouterr().out
    assert "8 decoding requests" in out and "p50" in out and "p99" in out
