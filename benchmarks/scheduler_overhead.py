"""Scheduler overhead: the CPU time of one step (``schedule`` + ``update_from_output``) with
every request decoding, against a no-op runner that samples one token per request.

    python -m caldera.benchmarks.scheduler_overhead [--num-requests 256] [--steps 2000]

Prompts are random, 600 to 3,000 tokens; requests first prefill (not timed), then the timed
steps decode. The runner's own time is not counted.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence

from caldera.scheduler import (
    ModelRunnerOutput,
    Request,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


class NoopRunner:
    """Samples token 7 for each request whose scheduled tokens reach the end of its tokens."""

    def __init__(self) -> None:
        self._left: dict[str, int] = {}  # tokens to compute before the next sample

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        left = self._left
        for req_id in out.finished_req_ids:
            left.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            left[new.req_id] = len(new.prompt_token_ids) - new.num_computed_tokens
        if any(out.scheduled_cached_reqs.resumed_from_preemption):
            raise RuntimeError("a request was preempted: give the benchmark more blocks")
        req_ids = list(out.num_scheduled_tokens)
        sampled = []
        for req_id, num in out.num_scheduled_tokens.items():
            remaining = left[req_id] - num
            left[req_id] = remaining if remaining > 0 else 1
            sampled.append([7] if remaining <= 0 else [])
        nones = [None] * len(req_ids)
        return ModelRunnerOutput(req_ids, sampled, nones, nones)


def build_scheduler(num_requests: int, min_len: int, max_len: int, seed: int) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=num_requests,
        max_num_batched_tokens=8192,
        max_model_len=8192,
        block_size=16,
        num_gpu_blocks=num_requests * 8192 // 16,
        enable_prefix_caching=True,
    )
    scheduler = Scheduler(config)
    rng = random.Random(seed)
    for i in range(num_requests):
        prompt = [rng.randrange(32000) for _ in range(rng.randint(min_len, max_len))]
        scheduler.add_request(Request(f"req-{i}", prompt, max_tokens=100_000))
    return scheduler


def run_step(scheduler: Scheduler, runner: NoopRunner) -> tuple[int, int]:
    """One step; returns the nanoseconds spent in schedule and in update_from_output."""
    start = time.perf_counter_ns()
    out = scheduler.schedule()
    scheduled = time.perf_counter_ns()
    runner_output = runner.execute(out)
    updating = time.perf_counter_ns()
    scheduler.update_from_output(out, runner_output)
    done = time.perf_counter_ns()
    return scheduled - start, done - updating


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--min-len", type=int, default=600)
    parser.add_argument("--max-len", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    scheduler = build_scheduler(args.num_requests, args.min_len, args.max_len, args.seed)
    runner = NoopRunner()
    warmup_steps = 0
    while len(scheduler.running) < args.num_requests or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running
    ):
        run_step(scheduler, runner)
        warmup_steps += 1
    schedule_us, update_us, total_us = [], [], []
    for _ in range(args.steps):
        schedule_ns, update_ns = run_step(scheduler, runner)
        schedule_us.append(schedule_ns / 1000)
        update_us.append(update_ns / 1000)
        total_us.append((schedule_ns + update_ns) / 1000)

    print(
        f"{args.num_requests} decoding requests, prompts {args.min_len}-{args.max_len} tokens, "
        f"block size 16, {args.steps} steps after {warmup_steps} prefill steps"
    )
    for name, values in (("step", total_us), ("schedule", schedule_us), ("update", update_us)):
        print(
            f"{name:>8}: p50 {percentile(values, 0.5):8.1f} us   p99 "
            f"{percentile(values, 0.99):8.1f} us   mean {statistics.fmean(values):8.1f} us"
        )


if __name__ == "__main__":
    main()
