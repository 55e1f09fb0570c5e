"""Helpers shared by tests: test images and a hand-driven batch loop over a ModelRunner
(the scheduler's job, done by hand so the runner is tested alone)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from caldera.engine.processor import ProcessedPrompt
from caldera.engine.sampling_params import SamplingParams
from caldera.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from caldera.worker.model_runner import ModelRunner

BLOCK_SIZE = 16


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth image with some noise: resizing it exercises interpolation, not just noise."""
    rng = np.random.RandomState(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    phase = rng.uniform(0, 6, size=(1, 1, 3))
    base = 0.5 + 0.4 * np.sin(6 * x + 4 * y + phase)
    pixels = np.clip(base * 255 + rng.normal(0, 12, (height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def generate(
    runner: ModelRunner,
    prompts: list[ProcessedPrompt],
    params: list[SamplingParams],
    chunk: int = 1 << 30,
) -> list[list[int]]:
    """Runs the requests together to max_tokens each: every step, each unfinished request
    computes up to ``chunk`` of its pending tokens. Blocks are assigned in a shuffled order so
    no request owns a contiguous range."""
    rng = np.random.RandomState(1234)
    free = list(rng.permutation(runner.num_blocks))
    ids = [f"req-{i}" for i in range(len(prompts))]
    blocks: dict[str, list[int]] = {r: [] for r in ids}
    computed = dict.fromkeys(ids, 0)
    outputs: dict[str, list[int]] = {r: [] for r in ids}
    known: set[str] = set()
    while True:
        active = [i for i, r in enumerate(ids) if len(outputs[r]) < params[i].max_tokens]
        if not active:
            break
        new, cached, counts = [], CachedRequestData(), {}
        encoder: dict[str, list[int]] = {}
        for i in active:
            r = ids[i]
            total = len(prompts[i].token_ids) + len(outputs[r])
            n = min(chunk, total - computed[r])
            needed = -(-(computed[r] + n) // BLOCK_SIZE) - len(blocks[r])
            added = [int(free.pop()) for _ in range(max(needed, 0))]
            blocks[r].extend(added)
            counts[r] = n
            start, end = computed[r], computed[r] + n
            # An image is encoded in the step whose tokens first reach its placeholders.
            enc = [k for k, img in enumerate(prompts[i].images) if start <= img.offset < end]
            if enc:
                encoder[r] = enc
            if r not in known:
                known.add(r)
                new.append(NewRequestData(r, prompts[i].token_ids, prompts[i].images, params[i],
                                          list(blocks[r]), computed[r]))
            else:
                cached.req_ids.append(r)
                cached.resumed_from_preemption.append(False)
                cached.new_block_ids.append(added)
                cached.num_computed_tokens.append(computed[r])
        out = runner.execute_model(SchedulerOutput(new, cached, counts, sum(counts.values()),
                                                   encoder))
        for r, sampled in zip(out.req_ids, out.sampled_token_ids):
            computed[r] += counts[r]
            outputs[r].extend(sampled)
    return [outputs[r] for r in ids]


def greedy_chat_text(model_dir: object, messages: list[dict], max_tokens: int,
                     **engine: object) -> str:
    """What one in-process engine answers, greedy: the reference for servers and workers."""
    from caldera.engine import LLM

    llm = LLM(str(model_dir), **engine)
    try:
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        return llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
