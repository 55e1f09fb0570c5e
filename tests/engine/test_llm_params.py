"""Sampling parameters and stop conditions through the offline API, as a user sees them."""

from __future__ import annotations

import pytest
from support import make_image

from caldera.engine import LLM, SamplingParams
from caldera.engine.processor import PromptError

PROMPT = "USER: <image>\nWhat is this? ASSISTANT:"


@pytest.fixture(scope="module")
def llm(llava15_dir):
    engine = LLM(str(llava15_dir), max_model_len=2048, kv_cache_memory="32MiB")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def greedy(llm):
    out = llm.generate({"prompt": PROMPT, "images": [make_image(200, 300)]},
                       SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    return out


def test_output_shape(greedy):
    completion = greedy.outputs[0]
    assert len(completion.token_ids) == 16 and completion.finish_reason == "length"
    assert completion.text and greedy.prompt_token_ids.count(32000) == 576
    assert greedy.metrics.time_to_first_token > 0
    assert greedy.metrics.tokens_per_second > 0


def test_stop_string_cuts_text(llm, greedy):
    text = greedy.outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    out = llm.generate({"prompt": PROMPT, "images": [make_image(200, 300)]},
                       SamplingParams(temperature=0, max_tokens=16, stop=[stop],
                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


def test_stop_token_ids_and_min_tokens(llm, greedy):
    tokens = greedy.outputs[0].token_ids
    image = make_image(200, 300)
    out = llm.generate({"prompt": PROMPT, "images": [image]},
                       SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[tokens[3]],
                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == tokens[:4] and out.finish_reason == "stop"
    assert out.stop_reason == tokens[3]
    held = llm.generate({"prompt": PROMPT, "images": [image]},
                        SamplingParams(temperature=0, max_tokens=16, min_tokens=8,
                                       stop_token_ids=[tokens[3]], ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert tokens[3] not in held.token_ids[:8]


def test_n_sequences_and_logprobs(llm):
    out = llm.generate("USER: Tell me a joke. ASSISTANT:",
                       SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, logprobs=2,
                                      prompt_logprobs=1, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    for completion in out.outputs:
        assert len(completion.logprobs) == 6
        for token, entry in zip(completion.token_ids, completion.logprobs):
            assert token in entry and len(entry) in (2, 3)
            assert entry[token].logprob <= 0
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, entry in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in entry


def test_prompt_too_long_is_refused(llm):
    with pytest.raises(PromptError, match="max_model_len is 2048"):
        llm.generate("word " * 3000, use_tqdm=False)


def test_marker_count_mismatch_is_refused(llm):
    with pytest.raises(PromptError, match="1 <image> marker"):
        llm.generate({"prompt": PROMPT, "images": []}, use_tqdm=False)


def test_chat_with_image_url_part(llm):
    image = make_image(64, 64)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image}},
        {"type": "text", "text": "<image>What is shown in this image?"},
    ]}]
    out = llm.chat(messages, SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)[0]
    assert out.prompt_token_ids.count(32000) == 576
    assert len(out.outputs[0].token_ids) >= 1


def test_seeded_sampling_repeats(llm):
    params = SamplingParams(temperature=0.8, top_k=50, seed=99, max_tokens=8, ignore_eos=True)
    first = llm.generate("USER: Hi ASSISTANT:", params, use_tqdm=False)[0].outputs[0].token_ids
    again = llm.generate("USER: Hi ASSISTANT:", params, use_tqdm=False)[0].outputs[0].token_ids
    assert first == again
