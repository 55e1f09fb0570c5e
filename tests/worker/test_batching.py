"""Greedy tokens do not depend on batching: requests computed together in one batch, alone,
and with their prompts split into chunks of 1, 7 and 64 tokens give identical tokens."""

from __future__ import annotations

import pytest
from support import generate, make_image

from caldera.engine.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(loaded_models):
    loaded = loaded_models["llava-1.5"]
    return loaded, [
        loaded.processor.process("USER: <image>\nWhat is this? ASSISTANT:",
                                 [make_image(300, 500, seed=1)]),
        loaded.processor.process("USER: Write a haiku about rain. ASSISTANT:"),
        loaded.processor.process("USER: <image>\n<image>\nCompare them. ASSISTANT:",
                                 [make_image(120, 90, seed=2), make_image(700, 400, seed=3)]),
    ]


@pytest.fixture(scope="module")
def alone(prompts):
    loaded, items = prompts
    return [generate(loaded.runner(), [p], [PARAMS])[0] for p in items]


def test_batch_equals_alone(prompts, alone):
    loaded, items = prompts
    assert generate(loaded.runner(), items, [PARAMS] * len(items)) == alone


@pytest.mark.parametrize("chunk", [7, 64])
def test_chunked_prefill_equals_alone(prompts, alone, chunk):
    loaded, items = prompts
    assert generate(loaded.runner(), items, [PARAMS] * len(items), chunk=chunk) == alone


def test_one_token_chunks_equal_alone(prompts, alone):
    loaded, items = prompts
    # The text-only prompt: one token per step through the whole prefill.
    assert generate(loaded.runner(), [items[1]], [PARAMS], chunk=1)[0] == alone[1]


def test_llava_next_chunked_with_images(loaded_models):
    loaded = loaded_models["llava-next-mistral"]
    items = [
        loaded.processor.process("[INST] <image>\nWhat is this? [/INST]",
                                 [make_image(480, 640, seed=4)]),
        loaded.processor.process("[INST] <image>\nAnd this? [/INST]",
                                 [make_image(1000, 200, seed=5)]),
    ]
    params = [PARAMS] * 2
    together = generate(loaded.runner(), items, params)
    assert together == [generate(loaded.runner(), [p], [PARAMS])[0] for p in items]
    assert generate(loaded.runner(), items, params, chunk=64) == together
