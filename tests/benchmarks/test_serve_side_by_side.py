"""The side-by-side script: its table and plot from two servers' results, and one real run
against ``caldera serve`` alone (vLLM is never installed in CI)."""

from __future__ import annotations

import json

from caldera.benchmarks import serve_side_by_side


def _result(rps: float, ttft_p99: float) -> dict:
    stats = {"mean": ttft_p99 / 2, "p50": ttft_p99 / 2, "p90": ttft_p99, "p99": ttft_p99}
    return {"completed": 4, "failed": 0, "duration_s": 4 / rps, "request_throughput": rps,
            "output_throughput": rps * 10, "ttft_ms": stats, "itl_ms": stats, "e2e_ms": stats}


def test_compare_and_plot(tmp_path, capsys):
    caldera = {(0.0, 1): _result(2.0, 100.0), (0.0, 8): _result(3.0, 900.0)}
    vllm = {(0.0, 1): _result(1.0, 200.0), (0.0, 8): _result(3.5, 800.0)}
    rows = serve_side_by_side.compare(caldera, vllm)
    assert [r["targets_met"] for r in rows] == [True, False]
    assert rows[0]["throughput_ratio"] == 2.0 and rows[1]["ttft_p99_ratio"] == 900 / 800
    assert "met in 1/2" in capsys.readouterr().out
    png = tmp_path / "plot.png"
    serve_side_by_side.plot(rows, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_caldera_side_runs(llava15_dir, tmp_path):
    out = tmp_path / "out"
    serve_side_by_side.main([
        "--vllm-python", "unused", "--only", "caldera", "--model-dir", str(llava15_dir),
        "--out-dir", str(out), "--concurrency", "2", "--repeat-shares", "0.5",
        "--min-prompts", "2", "--prompts-per-client", "1", "--prompt-len", "8",
        "--output-len", "3", "--image-size", "64:128", "--max-model-len", "1024",
        "--max-num-seqs", "4"])
    report = json.loads((out / "caldera-repeat0.5-c2.json").read_text())
    assert report["completed"] == 2 and report["failed"] == 0
    assert report["max_concurrency"] == 2 and report["dataset"]["repeated_requests"] == 1
