"""The serving benchmark runs end to end on a tiny checkpoint: the offline LLM, ``caldera
serve`` on a loopback port, streaming clients and the image load (no timing checks)."""

from __future__ import annotations

import json

import torch

from caldera.benchmarks import serving_throughput


def test_benchmark_prints_its_summary(llava15_dir, tmp_path, capsys):
    results = tmp_path / "results.json"
    summary = serving_throughput.main([
        "--model-dir", str(llava15_dir),
        "--num-requests", "4", "--concurrency", "2", "--prompt-len", "8:16",
        "--output-len", "3:6", "--image-every", "2", "--image-size", "200:300",
        "--itl-streams", "2", "--itl-prompt-len", "8:12", "--itl-output-len", "6:8",
        "--image-clients", "1", "--image-variants", "1", "--itl-image-size", "300:400",
        "--max-num-seqs", "4", "--kv-cache-memory", "64MiB", "--json", str(results),
    ])
    out = capsys.readouterr().out
    assert "== throughput: 4 requests (2 with an image)" in out
    assert "HTTP / offline:" in out and "identical texts" in out
    assert "CPU s (waiting for a CPU s): offline process" in out
    assert "text alone, again" in out and "p99 ITL with images / text alone:" in out
    throughput = summary["throughput"]
    assert throughput["offline_tok_s"] > 0 and throughput["http_tok_s"] > 0
    # Greedy, same requests: the server streams what the offline engine returns.
    assert throughput["identical_texts"] == 4
    runs = summary["interference"]["runs"]
    assert list(runs) == ["text alone", "with 1 image clients", "text alone, again",
                          "same image work, outside", "text alone, last"]
    assert runs["with 1 image clients"]["image_requests"] >= 1
    assert runs["same image work, outside"]["outside_rate"] > 0
    assert "image work outside" in runs["same image work, outside"]["cpu"]
    assert "the machine's share of the growth" in out
    assert {"engine", "API", "image worker 1", "clients"} <= set(runs["text alone"]["cpu"])
    assert json.loads(results.read_text())["threads"] == torch.get_num_threads()


def test_requests_are_seeded_and_salting_keeps_lengths(llava15_dir, tmp_path):
    def workloads() -> serving_throughput.ChatWorkloads:
        return serving_throughput.ChatWorkloads(llava15_dir, "llava-1.5", 3, tmp_path,
                                                "http://127.0.0.1:9")

    first = workloads().build("x", 4, (8, 16), (5, 9), (200, 300), 2)
    again = workloads().build("x", 4, (8, 16), (5, 9), (200, 300), 2)
    assert [r.messages for r in first] == [r.messages for r in again]
    assert all(5 <= r.max_tokens <= 9 for r in first)
    # One image in every second request, inline and by URL in turn.
    urls = [r.messages[0]["content"][0]["image_url"]["url"] for r in first[::2]]
    assert urls[0].startswith("data:image/jpeg;base64,") and urls[1].startswith("http://")
    assert all(r.prompt_len >= 576 + 8 for r in first[::2])
    texts = workloads().build("t", 3, (8, 16), (5, 9), None, 0)
    salted = workloads().salted(texts, 5)
    assert [r.prompt_len for r in salted] == [r.prompt_len for r in texts]
    assert all(a.messages != b.messages for a, b in zip(salted, texts))
