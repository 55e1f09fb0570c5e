"""The transformers baseline of the offline benchmarks: ``generate`` with static batching.

The requests are sorted and cut into fixed-size batches, each left-padded and run by one
``model.generate`` call to the longest output asked for in the batch (``min_new_tokens`` =
``max_new_tokens``, greedy), the most a user of transformers can do without a serving
engine. Only the tokens each request asked for count as useful: the tokens generated past a
request's own length, to keep pace with the longest one in its batch, are waste.

Sorting uses what an offline caller knows before generating: the output length it asks for,
then the prompt length, so a batch wastes as few steps and pad tokens as possible (the most
favourable grouping for transformers). The timed path is what a user runs: the processor
(tokenizer, image preprocessing, ``<image>`` expansion) and ``generate`` for each batch.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image


@dataclass
class HFRun:
    """One pass over every request at one batch size (``stopped`` when cut short because it
    was already slower than the best pass before it; its outputs are then incomplete)."""

    batch_size: int
    wall_s: float
    useful_tokens: int
    outputs: list[list[int] | None] = field(default_factory=list)
    prompt_token_ids: list[list[int] | None] = field(default_factory=list)
    stopped: bool = False
    usage: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s if self.wall_s > 0 else 0.0


class HFBaseline:
    """A llava-hf checkpoint loaded by transformers (processor + model), float32 on CPU."""

    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.processor.tokenizer.padding_side = "left"
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_dir, dtype=dtype
        ).eval()
        tokenizer = self.processor.tokenizer
        self.pad_token_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def generate_batch(
        self, prompts: Sequence[str], images: Sequence[Image.Image | None], max_tokens: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """One left-padded batch to ``max_tokens`` new tokens: (prompt ids, new ids) per row."""
        pictures = [image for image in images if image is not None]
        if pictures and len(pictures) != len(images):
            raise ValueError("a batch mixes requests with and without images")
        inputs = self.processor(
            text=list(prompts), images=pictures or None, padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=self.pad_token_id,
            )
        width = inputs["input_ids"].shape[1]
        mask = inputs["attention_mask"].bool()
        prompt_ids = [row[keep].tolist() for row, keep in zip(inputs["input_ids"], mask)]
        return prompt_ids, out[:, width:].tolist()

    def run(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image | None],
        max_tokens: Sequence[int],
        prompt_lens: Sequence[int],
        batch_size: int,
        give_up_after_s: float | None = None,
    ) -> HFRun:
        """Every request, in static batches of ``batch_size``; stops early (``stopped``) once
        the time spent exceeds ``give_up_after_s``."""
        order = static_batch_order(max_tokens, prompt_lens)
        outputs: list[list[int] | None] = [None] * len(prompts)
        prompt_ids: list[list[int] | None] = [None] * len(prompts)
        usage = ProcessUsage()
        start = time.perf_counter()
        for first in range(0, len(order), batch_size):
            batch = order[first : first + batch_size]
            longest = max(max_tokens[i] for i in batch)
            ids, new = self.generate_batch(
                [prompts[i] for i in batch], [images[i] for i in batch], longest
            )
            for i, row_prompt, row_new in zip(batch, ids, new):
                prompt_ids[i], outputs[i] = row_prompt, row_new[: max_tokens[i]]
            elapsed = time.perf_counter() - start
            if (
                give_up_after_s is not None
                and elapsed > give_up_after_s
                and first + batch_size < len(order)
            ):
                useful = sum(len(o) for o in outputs if o is not None)
                return HFRun(batch_size, elapsed, useful, outputs, prompt_ids, True, usage.delta())
        wall = time.perf_counter() - start
        return HFRun(batch_size, wall, sum(max_tokens), outputs, prompt_ids, False, usage.delta())

    def sweep(
        self,
        prompts: Sequence[str],
        images: Sequence[Image.Image | None],
        max_tokens: Sequence[int],
        prompt_lens: Sequence[int],
        batch_sizes: Sequence[int],
    ) -> list[HFRun]:
        """One pass per batch size; a pass is stopped as soon as it is slower than the best
        finished one, so a sweep costs at most ``len(batch_sizes)`` times the best pass."""
        runs: list[HFRun] = []
        for batch_size in batch_sizes:
            finished = [r.wall_s for r in runs if not r.stopped]
            limit = min(finished) if finished else None
            runs.append(self.run(prompts, images, max_tokens, prompt_lens, batch_size, limit))
        return runs


class ProcessUsage:
    """CPU time and minor page faults of this process since construction: a large system
    time with many faults means the run spent its time getting fresh pages from the kernel
    (large temporaries allocated and freed again every step)."""

    def __init__(self) -> None:
        self._start = resource.getrusage(resource.RUSAGE_SELF)

    def delta(self) -> dict[str, float]:
        now = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "user_s": now.ru_utime - self._start.ru_utime,
            "sys_s": now.ru_stime - self._start.ru_stime,
            "minor_faults": now.ru_minflt - self._start.ru_minflt,
        }


def static_batch_order(max_tokens: Sequence[int], prompt_lens: Sequence[int]) -> list[int]:
    """Request indices, longest output first, then longest prompt: neighbours pad little."""
    return sorted(range(len(max_tokens)), key=lambda i: (-max_tokens[i], -prompt_lens[i]))


def best_run(runs: Sequence[HFRun]) -> HFRun:
    finished = [r for r in runs if not r.stopped]
    if not finished:
        raise ValueError("no transformers pass finished")
    return min(finished, key=lambda r: r.wall_s)
