"""The vision tower's attention backend: torch SDPA on CPU (xformers only on CUDA), and the
selected function is what the tower runs."""

from __future__ import annotations

import torch

from caldera.worker.models.clip import sdpa_attention, select_vision_attention


def test_cpu_uses_sdpa():
    fn, name = select_vision_attention(torch.device("cpu"), torch.float32)
    assert fn is sdpa_attention and name == "torch sdpa"


def test_sdpa_layout_matches_plain_attention():
    q, k, v = (torch.randn(2, 7, 3, 16) for _ in range(3))
    scores = torch.einsum("nlhd,nmhd->nhlm", q, k) / 4.0
    expected = torch.einsum("nhlm,nmhd->nlhd", scores.softmax(-1), v)
    torch.testing.assert_close(sdpa_attention(q, k, v), expected, rtol=1e-5, atol=1e-5)


def test_worker_logs_the_choice(llava15_dir, caplog):
    from caldera.worker.worker import Worker, WorkerConfig

    with caplog.at_level("INFO", logger="caldera.worker.worker"):
        worker = Worker(WorkerConfig(model_dir=str(llava15_dir), kv_cache_bytes=2**22,
                                     max_model_len=1024))
    assert "vision tower attention: torch sdpa" in caplog.text
    layer = worker.model.vision_tower.vision_model.encoder.layers[0]
    assert layer.self_attn.attention_fn is sdpa_attention
