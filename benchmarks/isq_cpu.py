"""Decode speed and weight memory on CPU for float32, bfloat16, int8 and int4 (ISQ) on the
bench model shape, each run in the same process on the same requests.

    python -m caldera.benchmarks.isq_cpu [--requests 8] [--max-tokens 128]

Prints, per configuration: weight MiB, decode tokens/s, and both as a ratio to float32.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from caldera.engine import LLM, SamplingParams
from caldera.engine.demo_checkpoints import BENCH_SIZES, build_tiny_checkpoint
from caldera.worker.isq import model_bytes

CONFIGS = [
    ("float32", {"dtype": "float32"}),
    ("bfloat16", {"dtype": "bfloat16"}),
    ("int8 (fp32 act)", {"dtype": "float32", "isq": "8"}),
    ("int4 (fp32 act)", {"dtype": "float32", "isq": "4"}),
    ("int8 (bf16 act)", {"dtype": "bfloat16", "isq": "8"}),
    ("int4 (bf16 act)", {"dtype": "bfloat16", "isq": "4"}),
]


def measure(model_dir: Path, options: dict, prompts: list[str], max_tokens: int) -> tuple:
    llm = LLM(str(model_dir), max_model_len=2048, kv_cache_memory="512MiB", **options)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    weights = model_bytes(llm.engine.core.executor.worker.model)
    llm.shutdown()
    return weights, tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "config.json").exists():
        model_dir = model_dir or Path(tempfile.mkdtemp(prefix="caldera-bench-"))
        build_tiny_checkpoint("llava-1.5", model_dir, **BENCH_SIZES)
    prompts = [f"USER: Write a long story number {i} about the sea. ASSISTANT:"
               for i in range(args.requests)]
    rows = []
    for name, options in CONFIGS:
        weights, speed = measure(model_dir, options, prompts, args.max_tokens)
        rows.append((name, weights, speed))
    base_weights, base_speed = rows[0][1], rows[0][2]
    print(f"{args.requests} requests x {args.max_tokens} tokens, greedy, bench shape "
          f"({BENCH_SIZES['hidden_size']}-wide, {BENCH_SIZES['num_layers']} layers)")
    print(f"{'config':<18}{'weights MiB':>12}{'vs fp32':>9}{'decode tok/s':>14}{'vs fp32':>9}")
    for name, weights, speed in rows:
        print(f"{name:<18}{weights / 2**20:>12.1f}{weights / base_weights:>9.2f}"
              f"{speed:>14.1f}{speed / base_speed:>9.2f}")


if __name__ == "__main__":
    main()
