"""The engine end to end on a tiny checkpoint through the offline LLM API: outputs must not
depend on the KV cache size (preemption), prefix caching, the token budget, or what else is in
the batch, and must equal transformers."""

from __future__ import annotations

import pytest
import torch
from support import make_image

from caldera.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
BLOCK_BYTES_MISTRAL = 2 * 2 * 2 * 32 * 16 * 4  # k+v, layers, kv heads, head dim, block, fp32


def _prompts() -> list:
    p = "[INST] <image>\nWhat is in this picture? [/INST]"
    shared = make_image(300, 500, seed=7)
    return [
        {"prompt": p, "images": [shared]},
        {"prompt": p, "images": [make_image(640, 480, seed=8)]},
        "[INST] Tell me a story about a lighthouse keeper. [/INST]",
        {"prompt": "[INST] <image>\nAnd this one, compared to <image>? [/INST]",
         "images": [make_image(200, 700, seed=9), shared]},
        {"prompt": p, "images": [shared]},  # same image again: prefix + encoder cache hits
    ]


def _run(path, prompts=None, params=GREEDY, **options) -> tuple[list[list[int]], LLM]:
    options.setdefault("max_model_len", 4096)
    options.setdefault("kv_cache_memory", 1024 * BLOCK_BYTES_MISTRAL)
    llm = LLM(str(path), **options)
    outs = llm.generate(prompts or _prompts(), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm


@pytest.fixture(scope="module")
def baseline(next_mistral_dir):
    tokens, llm = _run(next_mistral_dir)
    llm.shutdown()
    return tokens


def test_outputs_are_full_length_and_varied(baseline):
    assert all(len(t) == 24 for t in baseline)
    assert baseline[0] == baseline[4]  # identical requests
    assert len({tuple(t) for t in baseline}) >= 3


def test_preemption_keeps_outputs(next_mistral_dir, baseline):
    # Room for one long sequence and a bit: the five requests cannot all run at once.
    tokens, llm = _run(next_mistral_dir, kv_cache_memory=300 * BLOCK_BYTES_MISTRAL)
    stats = llm.engine.core.scheduler.get_stats()
    assert stats.num_preemptions > 0
    assert tokens == baseline
    assert stats.kv_cache_usage == 0.0


def test_prefix_caching_off_keeps_outputs(next_mistral_dir, baseline):
    tokens, _ = _run(next_mistral_dir, enable_prefix_caching=False)
    assert tokens == baseline


@pytest.mark.parametrize("budget", [16, 64, 2048])
def test_token_budget_keeps_outputs(next_mistral_dir, baseline, budget):
    tokens, _ = _run(next_mistral_dir, max_num_batched_tokens=budget)
    assert tokens == baseline


def test_prefix_cache_hits_repeated_image(next_mistral_dir):
    _, llm = _run(next_mistral_dir)
    stats = llm.engine.core.scheduler.get_stats()
    assert stats.prefix_cache_hits > 0


def test_matches_transformers(next_mistral_dir, baseline):
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(next_mistral_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        next_mistral_dir, dtype=torch.float32).eval()
    for prompt, expected in zip(_prompts()[:4], baseline):
        if isinstance(prompt, str):
            inputs = processor(text=prompt, return_tensors="pt")
        else:
            inputs = processor(text=prompt["prompt"], images=prompt["images"],
                               return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=24, min_new_tokens=24,
                                 do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == expected


def test_seeded_request_same_alone_and_in_batch(next_mistral_dir):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=16,
                            ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    prompts = _prompts()
    alone, llm = _run(next_mistral_dir, [prompts[1]], seeded)
    batch = llm.generate(prompts, [other, seeded, other, other, other], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone[0]


def test_multiprocess_client_matches_inprocess(next_mistral_dir, baseline):
    tokens, llm = _run(next_mistral_dir, multiprocess=True)
    try:
        assert tokens == baseline
    finally:
        llm.shutdown()


def test_killed_engine_fails_pending_requests(next_mistral_dir):
    import threading

    from caldera.engine.core_client import EngineDeadError

    llm = LLM(str(next_mistral_dir), multiprocess=True, max_model_len=4096,
              kv_cache_memory=1024 * BLOCK_BYTES_MISTRAL)
    killer = threading.Timer(1.0, llm.engine.process.kill)
    killer.start()
    try:
        with pytest.raises(EngineDeadError, match="exit code"):
            llm.generate(_prompts(), SamplingParams(max_tokens=3000, ignore_eos=True),
                         use_tqdm=False)
        with pytest.raises(EngineDeadError):  # later requests fail at once too
            llm.generate("[INST] hi [/INST]", use_tqdm=False)
    finally:
        killer.cancel()
        llm.shutdown()
