"""The offline throughput benchmark runs end to end on a tiny checkpoint (no timing checks)."""

from __future__ import annotations

import json

import pytest

from caldera.benchmarks import offline_throughput

pytest.importorskip("transformers")


def test_benchmark_runs_both_workloads(llava15_dir, tmp_path, capsys):
    results = tmp_path / "results.json"
    summaries = offline_throughput.main(
        [
            "--model-dir",
            str(llava15_dir),
            "--num-requests",
            "3",
            "--prompt-len",
            "8:20",
            "--image-output-len",
            "3:6",
            "--decode-output-len",
            "3:9",
            "--image-size",
            "200:400",
            "--max-num-seqs",
            "2",
            "--hf-batch-sizes",
            "2,3",
            "--json",
            str(results),
        ]
    )
    out = capsys.readouterr().out
    assert "image-heavy: 3 requests" in out and "decode-heavy: 3 requests" in out
    assert [s["workload"] for s in summaries] == ["image", "decode"]
    for summary in summaries:
        assert summary["caldera_tok_s"] > 0 and summary["hf_tok_s"] > 0
        assert summary["hf_batch_size"] in (2, 3)
        assert 0.0 < summary["kv_use"] <= 1.0
        assert summary["full_steps"] > 0  # steps with max_num_seqs requests running
    assert json.loads(results.read_text())[1]["workload"] == "decode"


def test_workloads_are_seeded_and_in_range(llava15_dir):
    builder = offline_throughput.WorkloadBuilder(llava15_dir, "llava-1.5", seed=3)
    first = builder.build("image", 4, (16, 32), (16, 192), (224, 512))
    again = builder.build("image", 4, (16, 32), (16, 192), (224, 512))
    assert [r.prompt for r in first.requests] == [r.prompt for r in again.requests]
    assert all(16 <= r.max_tokens <= 192 for r in first.requests)
    # 576 image tokens, the BOS and template tokens, and 16-32 words of one token each.
    assert all(576 + 16 <= r.prompt_len <= 576 + 32 + 12 for r in first.requests)
    assert all(r.image is not None for r in first.requests)
