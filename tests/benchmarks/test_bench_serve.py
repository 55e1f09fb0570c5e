"""``caldera bench serve`` against a real ``caldera serve`` on a tiny checkpoint: a handful of
multimodal streaming requests, the JSON report's fields and the plot (no timing checks)."""

from __future__ import annotations

import json
import random

import pytest
from server_support import ServerProcess

from caldera.api.cli import main
from caldera.benchmarks.bench_serve import DatasetSpec, arrival_times, build_dataset


def test_dataset_is_seeded_with_the_stated_shares_and_ranges():
    spec = DatasetSpec(num_prompts=12, prompt_len=10, output_len=8, range_ratio=0.5,
                       images_per_request=2, image_size=(64, 160), repeat_share=0.25,
                       repeat_pool=2, seed=3)
    data = build_dataset(spec)
    assert data == build_dataset(spec)
    assert data != build_dataset(DatasetSpec(**{**spec.__dict__, "seed": 4}))
    assert sum(r.repeated for r in data) == 3
    pooled = {r.images for r in data if r.repeated}
    assert len(pooled) <= 2
    assert all(5 <= len(r.prompt.split()) <= 15 and 4 <= r.max_tokens <= 12 for r in data)
    sizes = [s for r in data for s in r.image_sizes]
    assert all(64 <= max(s) <= 160 for s in sizes)
    assert len({round(w / h, 2) for w, h in sizes}) > 2  # several aspect ratios
    with pytest.raises(ValueError, match="--repeat-share"):
        DatasetSpec(repeat_share=2)


def test_poisson_arrivals():
    assert arrival_times(4, float("inf"), random.Random(0)) == [0.0] * 4
    starts = arrival_times(2000, 50.0, random.Random(0))
    assert starts == sorted(starts) and starts[0] == 0.0
    assert 30 < starts[-1] < 50  # 2000 arrivals at 50/s take about 40 s


def test_against_a_real_server(llava15_dir, tmp_path, capsys):
    server = ServerProcess(["--model", str(llava15_dir), "--served-model-name", "tiny",
                            "--kv-cache-memory", "64MiB", "--max-model-len", "2048", "--no-ui"],
                           api_key="sk-bench")
    try:
        out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
        code = main(["bench", "serve", "--base-url", server.base_url, "--api-key", "sk-bench",
                     "--num-prompts", "6", "--max-concurrency", "3", "--request-rate", "20",
                     "--prompt-len", "12", "--output-len", "4", "--image-size", "64:200",
                     "--repeat-share", "0.5", "--repeat-pool", "1", "--seed", "1",
                     "--json", str(out_json), "--plot", str(out_png), "--disable-tqdm"])
    finally:
        server.stop()
    assert code == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    report = json.loads(out_json.read_text())
    assert report["model"] == "tiny"  # asked from /v1/models
    assert report["completed"] == 6 and report["failed"] == 0
    assert report["dataset"]["repeated_requests"] == 3 and report["dataset"]["images"] == 6
    assert report["total_output_tokens"] == sum(r["output_tokens"] for r in report["requests"])
    assert report["total_output_tokens"] > 0 and report["total_input_tokens"] > 6 * 576
    for key in ("request_throughput", "output_throughput", "total_token_throughput"):
        assert report[key] > 0
    for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        stats = report[key]
        assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert len(report["requests"]) == 6
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
