"""``caldera bench serve``: load a running OpenAI-compatible server with a generated multimodal
chat workload and report what its users would feel. Any such server works (Caldera, vLLM,
SGLang, llama.cpp's server): requests use only standard Chat Completions fields.

    caldera bench serve --base-url http://127.0.0.1:8000 [--model NAME] [--api-key KEY]
        [--num-prompts 200] [--request-rate inf | --max-concurrency 32] [--seed 0]
        [--images-per-request 1] [--image-size 256:1024] [--repeat-share 0.25]
        [--prompt-len 64] [--output-len 128] [--range-ratio 0.5]
        [--json results.json] [--plot latencies.png]

The dataset, fixed by ``--seed``:

- prompt: random common English words, their count uniform on the integers of
  [P(1-r), P(1+r)] (P ``--prompt-len``, r ``--range-ratio``); a word is about one token.
- output: ``max_tokens`` uniform on [O(1-r), O(1+r)] (O ``--output-len``). Servers may stop
  earlier at end of sequence; ``--ignore-eos`` adds vLLM's non-standard ``ignore_eos`` field.
- images: ``--images-per-request`` JPEG data URLs each, the longer side uniform in
  ``--image-size`` MIN:MAX pixels, the aspect ratio one of 1:1, 4:3, 3:4, 16:9, 9:16, 2:1,
  1:2. A share ``--repeat-share`` of the requests (exactly that share, rounded) use images
  from a pool of ``--repeat-pool`` pictures instead of new ones, so prefix and encoder caches
  have something to reuse.

Requests are sent in dataset order. ``--request-rate R`` starts them as a Poisson process of
rate R per second (exponential gaps; ``inf``, the default, starts all at once);
``--max-concurrency C`` keeps at most C in flight; both may be given. Every request streams.

Reported (mean, p50, p90, p99, in ms): time to first token (TTFT: send to the first chunk that
carries text), inter-token latency (ITL: between consecutive chunks that carry text), time per
output token (TPOT: (E2E - TTFT) / (output tokens - 1)), end-to-end latency (E2E: send to
``[DONE]``); and request throughput, output tokens/s and total tokens/s over the run. Output
tokens are the server's ``usage`` (asked for with ``stream_options.include_usage``), else the
count of text chunks. ``--plot`` draws the three latency distributions and output tokens/s
over time (matplotlib: ``pip install 'caldera[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

WARMUP_SEED_OFFSET = 1_000_003
ASPECT_RATIOS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2))
_WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are",
    "as", "with", "his", "they", "at", "be", "this", "have", "from", "or", "one", "had", "by",
    "word", "but", "not", "what", "all", "were", "we", "when", "your", "can", "said", "there",
    "use", "an", "each", "which", "she", "do", "how", "their", "if", "will", "up", "other",
    "about", "out", "many", "then", "them", "these", "so", "some", "her", "would", "make", "like",
    "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no",
    "way", "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its",
    "now", "find", "long", "down", "day", "did", "get", "come", "made", "may", "part", "picture",
    "image", "color", "light", "tree", "house", "river", "mountain", "street", "window", "city",
    "animal", "table",
)


# ---- the dataset ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    images: tuple[str, ...]  # data URLs
    image_sizes: tuple[tuple[int, int], ...]  # (width, height) of each
    repeated: bool  # the images come from the shared pool
    max_tokens: int


@dataclass(frozen=True)
class DatasetSpec:
    num_prompts: int = 200
    prompt_len: int = 64
    output_len: int = 128
    range_ratio: float = 0.5
    images_per_request: int = 1
    image_size: tuple[int, int] = (256, 1024)
    repeat_share: float = 0.25
    repeat_pool: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.num_prompts >= 1, "--num-prompts must be at least 1"),
            (self.prompt_len >= 1 and self.output_len >= 1,
             "--prompt-len and --output-len must be at least 1"),
            (0 <= self.range_ratio < 1, "--range-ratio must be in [0, 1)"),
            (self.images_per_request >= 0, "--images-per-request must be >= 0"),
            (16 <= self.image_size[0] <= self.image_size[1],
             "--image-size MIN:MAX needs 16 <= MIN <= MAX"),
            (0 <= self.repeat_share <= 1, "--repeat-share must be in [0, 1]"),
            (self.repeat_pool >= 1, "--repeat-pool must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def _length(rng: random.Random, mean: int, ratio: float) -> int:
    return rng.randint(max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio))))


def _picture(rng: random.Random, size: tuple[int, int]) -> str:
    """A JPEG data URL of a smooth random picture with some noise (not trivially compressible)."""
    import numpy as np
    from PIL import Image

    width, height = size
    gen = np.random.default_rng(rng.getrandbits(32))
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    freq = gen.uniform(2, 9, size=(1, 1, 3)).astype(np.float32)
    phase = gen.uniform(0, 6, size=(1, 1, 3)).astype(np.float32)
    base = 0.5 + 0.4 * np.sin(freq * x + 4 * y + phase)
    noise = gen.normal(0, 10, (height, width, 3)).astype(np.float32)
    pixels = np.clip(base * 255 + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_size(rng: random.Random, spec: DatasetSpec) -> tuple[int, int]:
    long_side = rng.randint(*spec.image_size)
    w, h = rng.choice(ASPECT_RATIOS)
    short_side = max(16, round(long_side * min(w, h) / max(w, h)))
    return (long_side, short_side) if w >= h else (short_side, long_side)


def build_dataset(spec: DatasetSpec) -> list[BenchRequest]:
    """The requests of ``spec``, the same for the same spec (seed included)."""
    rng = random.Random(spec.seed)
    n_images = spec.images_per_request
    pool_sizes = [_image_size(rng, spec) for _ in range(spec.repeat_pool * n_images)]
    pool = [_picture(rng, size) for size in pool_sizes] if n_images else []
    repeated = set(rng.sample(range(spec.num_prompts), round(spec.repeat_share * spec.num_prompts)))
    requests = []
    for i in range(spec.num_prompts):
        words = [rng.choice(_WORDS) for _ in range(_length(rng, spec.prompt_len, spec.range_ratio))]
        if i in repeated and n_images:
            start = rng.randrange(spec.repeat_pool) * n_images
            urls = pool[start:start + n_images]
            sizes = pool_sizes[start:start + n_images]
        else:
            sizes = [_image_size(rng, spec) for _ in range(n_images)]
            urls = [_picture(rng, size) for size in sizes]
        requests.append(BenchRequest(
            prompt=" ".join(words), images=tuple(urls), image_sizes=tuple(sizes),
            repeated=i in repeated and n_images > 0,
            max_tokens=_length(rng, spec.output_len, spec.range_ratio),
        ))
    return requests


# ---- one request --------------------------------------------------------------------------


@dataclass
class RequestResult:
    ok: bool
    start: float  # seconds since the run began
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # since the run began
    output_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Target:
    base_url: str
    endpoint: str
    model: str
    api_key: str | None
    temperature: float
    ignore_eos: bool


def request_body(target: Target, request: BenchRequest) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}}
                                     for url in request.images]
    content.append({"type": "text", "text": request.prompt})
    body: dict[str, Any] = {
        "model": target.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": request.max_tokens,
        "temperature": target.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    return body


async def send_request(client, target: Target, request: BenchRequest,
                       t0: float) -> RequestResult:
    """Streams one request; every failure is recorded in the result, never raised."""
    start = time.perf_counter()
    result = RequestResult(ok=False, start=start - t0)
    last: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", target.endpoint, json=request_body(target, request)) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                result.error = f"HTTP {r.status_code}: {text[:300]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error event: {json.dumps(chunk['error'])[:300]}"
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_tokens = usage.get("prompt_tokens")
                choices = chunk.get("choices") or []
                if not choices or not (choices[0].get("delta") or {}).get("content"):
                    continue
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
                result.chunk_times.append(now - t0)
    except Exception as exc:  # a benchmark reports failures; it does not stop at the first
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.ttft is not None
    if not result.ok:
        result.error = "the stream carried no text"
    return result


# ---- the run ------------------------------------------------------------------------------


def arrival_times(n: int, rate: float, rng: random.Random) -> list[float]:
    """Start offsets in seconds: a Poisson process of ``rate`` per second (all 0 for inf)."""
    if math.isinf(rate):
        return [0.0] * n
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


async def run(target: Target, dataset: Sequence[BenchRequest], request_rate: float,
              max_concurrency: int | None, seed: int, timeout: float,
              warmup: Sequence[BenchRequest], progress: bool
              ) -> tuple[list[RequestResult], float]:
    """Sends ``warmup`` one by one, untimed, then ``dataset``; returns each request's result
    and the run's duration in seconds."""
    import httpx

    limit = max_concurrency or len(dataset)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=target.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=60),
                                 trust_env=False) as client:
        for request in warmup:
            warm = await send_request(client, target, request, time.perf_counter())
            if not warm.ok:
                raise ValueError(f"the warm-up request to {target.base_url}{target.endpoint} "
                                 f"failed ({warm.error}); check --base-url, --endpoint, "
                                 "--model and --api-key")
        gate = asyncio.Semaphore(limit)
        starts = arrival_times(len(dataset), request_rate, random.Random(seed + 1))
        bar = _progress_bar(len(dataset), progress)
        t0 = time.perf_counter()

        async def one(request: BenchRequest, at: float) -> RequestResult:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - t0)))
            async with gate:
                result = await send_request(client, target, request, t0)
            bar.update(1)
            return result

        try:
            results = await asyncio.gather(*(one(r, at) for r, at in zip(dataset, starts)))
        finally:
            bar.close()
        return list(results), time.perf_counter() - t0


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="req", desc="bench serve",
                file=sys.stderr)


# ---- the numbers --------------------------------------------------------------------------


def distribution(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 of seconds, in milliseconds (None when there is no value)."""
    import numpy as np

    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output = sum(r.output_tokens for r in done)
    prompt = sum(r.prompt_tokens or 0 for r in done)
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done
            if r.output_tokens > 1 and r.e2e is not None and r.ttft is not None]
    return {
        "duration_s": duration,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": [r.error for r in results if not r.ok][:10],
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "request_throughput": len(done) / duration if duration > 0 else 0.0,
        "output_throughput": output / duration if duration > 0 else 0.0,
        "total_token_throughput": (prompt + output) / duration if duration > 0 else 0.0,
        "ttft_ms": distribution([r.ttft for r in done if r.ttft is not None]),
        "itl_ms": distribution([gap for r in done for gap in r.itl]),
        "tpot_ms": distribution(tpot),
        "e2e_ms": distribution([r.e2e for r in done if r.e2e is not None]),
    }


def print_summary(summary: dict[str, Any]) -> None:
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total output tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    print(f"{' Serving Benchmark Result ':=^60}")
    for name, value in rows:
        print(f"{name:<44}{value:>16}")
    for key, title in (("ttft_ms", "Time to First Token"), ("itl_ms", "Inter-token Latency"),
                       ("tpot_ms", "Time per Output Token"), ("e2e_ms", "End-to-end Latency")):
        print(f"{' ' + title + ' ':-^60}")
        for stat, value in summary[key].items():
            label = f"{'Mean' if stat == 'mean' else stat.upper()} {key[:-3].upper()} (ms)"
            print(f"{label:<44}{'n/a' if value is None else f'{value:.2f}':>16}")
    print("=" * 60)
    for error in summary["errors"][:3]:
        print(f"error: {error}")


def throughput_over_time(results: Sequence[RequestResult], duration: float,
                         bin_s: float = 1.0) -> tuple[list[float], list[float]]:
    """(bin starts, output tokens/s in each bin); a request's tokens are spread over its text
    chunks."""
    bins = max(1, math.ceil(duration / bin_s))
    counts = [0.0] * bins
    for r in results:
        if not r.ok or not r.chunk_times:
            continue
        per_chunk = r.output_tokens / len(r.chunk_times)
        for t in r.chunk_times:
            counts[min(int(t / bin_s), bins - 1)] += per_chunk
    return [i * bin_s for i in range(bins)], [c / bin_s for c in counts]


def plot(results: Sequence[RequestResult], summary: dict[str, Any], title: str,
         path: str | os.PathLike) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'caldera[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], [r.ttft * 1000 for r in done if r.ttft is not None], "TTFT (ms)",
         summary["ttft_ms"]),
        (axes[0][1], [g * 1000 for r in done for g in r.itl], "ITL (ms)", summary["itl_ms"]),
        (axes[1][0], [r.e2e * 1000 for r in done if r.e2e is not None], "E2E latency (ms)",
         summary["e2e_ms"]),
    ]
    for ax, values, label, stats in panels:
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4c72b0")
        for stat, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            if stats[stat] is not None:
                ax.axvline(stats[stat], color="#c44e52", linestyle=style,
                           label=f"{stat} {stats[stat]:.1f}")
        ax.set_xlabel(label)
        ax.set_ylabel("count")
        ax.legend(loc="upper right", fontsize=8)
    starts, rates = throughput_over_time(results, summary["duration_s"])
    ax = axes[1][1]
    ax.plot(starts, rates, drawstyle="steps-post", color="#55a868")
    ax.axhline(summary["output_throughput"], color="#c44e52", linestyle="--",
               label=f"mean {summary['output_throughput']:.1f}")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s")
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------------


def _size_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX pixels, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers ``serve`` under ``caldera bench``."""
    p = subparsers.add_parser("serve", help="load a running OpenAI-compatible server",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="the server, without /v1 (default: http://127.0.0.1:8000)")
    p.add_argument("--endpoint", default="/v1/chat/completions")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second, Poisson arrivals (default: inf, all at once)")
    p.add_argument("--max-concurrency", type=int, help="most requests in flight at once")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("dataset")
    g.add_argument("--prompt-len", type=int, default=64, help="mean prompt length in words")
    g.add_argument("--output-len", type=int, default=128, help="mean max_tokens")
    g.add_argument("--range-ratio", type=float, default=0.5,
                   help="lengths are uniform on [L(1-r), L(1+r)]")
    g.add_argument("--images-per-request", type=int, default=1)
    g.add_argument("--image-size", type=_size_range, default=(256, 1024),
                   help="longer side in pixels, uniform on MIN:MAX (default 256:1024)")
    g.add_argument("--repeat-share", type=float, default=0.25,
                   help="share of requests whose images come from a small shared pool")
    g.add_argument("--repeat-pool", type=int, default=4, help="pictures in that pool")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--ignore-eos", action="store_true",
                   help="send vLLM's ignore_eos extension so every output is max_tokens long")
    o = p.add_argument_group("output")
    o.add_argument("--json", dest="json_path", help="write the results here")
    o.add_argument("--plot", help="draw latency distributions and throughput into this PNG")
    o.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    o.add_argument("--warmup-requests", type=int, default=1,
                   help="requests of their own sent one by one, not counted, before the run")
    o.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    p.set_defaults(func=main)
    return p


def _served_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(base_url + "/v1/models", headers=headers, timeout=30,
                             trust_env=False)
        response.raise_for_status()
        models = response.json().get("data") or []
    except (httpx.HTTPError, ValueError) as exc:
        raise ValueError(f"cannot list the models of {base_url} ({exc}); check --base-url and "
                         "--api-key, or pass --model") from None
    if not models:
        raise ValueError(f"{base_url}/v1/models lists no model; pass --model")
    return models[0]["id"]


def main(args: argparse.Namespace) -> int:
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    if not args.request_rate > 0:
        raise ValueError("--request-rate must be positive (inf: all at once)")
    spec = DatasetSpec(
        num_prompts=args.num_prompts, prompt_len=args.prompt_len, output_len=args.output_len,
        range_ratio=args.range_ratio, images_per_request=args.images_per_request,
        image_size=args.image_size, repeat_share=args.repeat_share,
        repeat_pool=args.repeat_pool, seed=args.seed,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    base_url = args.base_url.rstrip("/")
    model = args.model or _served_model(base_url, args.api_key)
    target = Target(base_url, args.endpoint, model, args.api_key, args.temperature,
                    args.ignore_eos)
    dataset = build_dataset(spec)
    # Warm-up requests of their own (another seed): none of the timed requests' images or
    # prompts is in a server cache before it is sent.
    warmup = build_dataset(replace(spec, num_prompts=args.warmup_requests,
                                   seed=spec.seed + WARMUP_SEED_OFFSET)) \
        if args.warmup_requests > 0 else []
    results, duration = asyncio.run(run(
        target, dataset, args.request_rate, args.max_concurrency, args.seed, args.timeout,
        warmup, not args.disable_tqdm))
    summary = summarize(results, duration)
    print_summary(summary)
    report = {
        "base_url": base_url, "endpoint": args.endpoint, "model": model,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "dataset": {**asdict(spec), "images": sum(len(r.images) for r in dataset),
                    "repeated_requests": sum(r.repeated for r in dataset)},
        **summary,
        "requests": [{"start_s": r.start, "ok": r.ok, "ttft_s": r.ttft, "e2e_s": r.e2e,
                      "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens,
                      "images": len(req.images), "repeated": req.repeated}
                     for r, req in zip(results, dataset)],
    }
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))
    if args.plot:
        rate = "inf" if math.isinf(args.request_rate) else f"{args.request_rate:g}/s"
        title = (f"{model} at {base_url}: {spec.num_prompts} requests, rate {rate}, "
                 f"concurrency {args.max_concurrency or 'unbounded'}")
        plot(results, summary, title, args.plot)
    return 0 if summary["completed"] else 1
