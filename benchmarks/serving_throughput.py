"""Serving throughput and latency: ``caldera serve`` through HTTP against the offline ``LLM``
on the same chat requests, and the inter-token latency of text streams while image requests
are being fetched and preprocessed.

    python -m caldera.benchmarks.serving_throughput [--model-dir DIR] [--threads N]
        [--num-requests 128] [--concurrency 64] [--itl-streams 32] [--image-clients 4]
        [--json PATH]

Throughput: a fixed-seed set of chat requests (every ``--image-every``-th with one image of
224-1024 pixels a side, as a JPEG data URL or from a loopback image server; prompts of 16-256
one-token words; outputs of 16-256 tokens forced with ``ignore_eos``, greedy) runs through
``LLM.chat`` (one call, every request), then through ``caldera serve`` started as a subprocess
on a free loopback port with the same engine options, sent by ``--concurrency`` streaming
clients, each taking the next request when its last one ends. Both sides count the output
tokens; reported: tokens/s of each, the ratio HTTP / offline (target >= 0.90), and the HTTP
side's time to first token and inter-token latency (ITL, between arrivals of SSE chunks that
carry text).

Interference: ``--itl-streams`` text-only streams with long outputs (and ``logprobs``, so
that every token is a chunk, even one with no text yet) run alone, then while
``--image-clients`` clients (in a process of their own) keep sending 2000x1500 JPEG requests,
half as data URLs and half from the image server, ``max_tokens`` 1; then alone again (the
pair repeated ``--itl-rounds`` times). Each run changes the first word of the text prompts, so
no run reuses another's prefix cache. The image requests reuse ``--image-variants`` pictures,
each sent once before the loaded runs, and their prompts end one token past a KV block: the
engine's prefix cache serves all but that token (no vision encoder run), so what they add is
the server's fetching, decoding and preprocessing, and one token of engine work each. The
server runs with ``--image-cache 0`` unless ``--image-cache`` says otherwise, so that every
image request is decoded and preprocessed again.
Reported: p50 / p99 / max ITL of the text streams in each run, over the part of it where every
stream decodes (not the start, where their own prefill makes some wait), and the ratio of the
loaded runs' mean p99 to the text-only runs' (target: no growth). The control
(``--outside-control``, on by default): the text streams once more beside a process that
does the image worker's decoding, preprocessing and hashing of the same pictures at the
loaded runs' image rate, with no request reaching the server. What the text streams lose
there is the machine's (CPU time, caches and memory bandwidth shared with the image work),
which no change in the serving path can take back.

Both sides compute with the same number of torch threads: ``--threads`` (default: torch's own
choice here) is set in this process and passed to the server's processes as
``OMP_NUM_THREADS``. The clients run in this process (and the image load in a child), on the
same machine: their CPU time is part of what the HTTP side pays. Each phase also reports the
CPU seconds every process ran and waited, runnable, for a CPU (Linux scheduler statistics): on
a shared machine, waiting tells a busy machine from slow code. ``--profile-api PATH`` runs the
server's API process under cProfile (its event loop thread) and prints the top entries.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caldera.benchmarks.offline_throughput import (
    PROMPT_TEMPLATES,
    WorkloadBuilder,
    ensure_checkpoint,
    parse_range,
    random_image,
)
from caldera.benchmarks.serving_load import (
    CPUClock,
    SchedTimes,
    StreamResult,
    engine_pid,
    format_cpu,
    free_port,
    image_load,
    image_work_outside,
    image_worker_pids,
    run_async,
    run_closed_loop,
    run_text_streams,
    server_command,
    steady_window,
    subprocess_at,
)
from caldera.engine import LLM, SamplingParams

# ==== requests ===============================================================================


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int
    prompt_len: int  # tokens, image placeholders included

    def body(self, stream: bool = True, logprobs: bool = False) -> bytes:
        """The HTTP request body, encoded once before any clock starts. ``logprobs`` makes
        the server send a chunk for every token, text or not."""
        payload: dict[str, Any] = {
            "model": "default", "messages": self.messages, "max_tokens": self.max_tokens,
            "temperature": 0.0, "ignore_eos": True,
        }
        if stream:
            payload |= {"stream": True, "stream_options": {"include_usage": True}}
        if logprobs:
            payload["logprobs"] = True
        return json.dumps(payload).encode()


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class ChatWorkloads:
    """Seeded chat requests over one-token words; images are written as JPEG into the image
    server's folder and named either there (URL) or inline (data URL), alternately."""

    def __init__(self, model_dir: Path, shape: str, seed: int, image_dir: Path,
                 image_url: str) -> None:
        self.builder = WorkloadBuilder(model_dir, shape, seed)
        self.before, self.after = PROMPT_TEMPLATES[shape]
        self.seed = seed
        self.image_dir = image_dir
        self.image_url = image_url
        self._images = 0

    def add_image(self, image: Image.Image, inline: bool) -> str:
        """The image's URL: a data URL, or the image server's URL for a file written now."""
        data = jpeg_bytes(image)
        if inline:
            return "data:image/jpeg;base64," + base64.b64encode(data).decode()
        name = f"image-{self._images}.jpg"
        self._images += 1
        (self.image_dir / name).write_bytes(data)
        return f"{self.image_url}/{name}"

    def request(self, text: str, image_url: str | None, image_size: tuple[int, int] | None,
                max_tokens: int) -> ChatRequest:
        content: list[dict[str, Any]] = []
        prompt = text
        if image_url is not None:
            content.append({"type": "image_url", "image_url": {"url": image_url}})
            prompt = "<image>\n" + text
        content.append({"type": "text", "text": text})
        length = len(self.builder.tokenizer.encode(self.before + prompt + self.after))
        if image_size is not None:
            length += self.builder.config.num_image_tokens(image_size) - 1
        return ChatRequest([{"role": "user", "content": content}], max_tokens, length)

    def build(self, name: str, count: int, prompt_len: tuple[int, int],
              output_len: tuple[int, int], image_size: tuple[int, int] | None,
              image_every: int) -> list[ChatRequest]:
        """``count`` requests; every ``image_every``-th has one image (0: none)."""
        rng = random.Random(f"{self.seed}-{name}")
        pixels = np.random.default_rng(rng.randrange(2**32))
        words = self.builder.words
        requests = []
        for index in range(count):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(*prompt_len)))
            url = size = None
            if image_size is not None and image_every and index % image_every == 0:
                size = (rng.randint(*image_size), rng.randint(*image_size))
                inline = (index // image_every) % 2 == 0
                url = self.add_image(random_image(pixels, *size), inline=inline)
            requests.append(self.request(text, url, size, rng.randint(*output_len)))
        return requests

    def salted(self, requests: Sequence[ChatRequest], salt: int) -> list[ChatRequest]:
        """The same text requests with their first word replaced (so a run does not hit the
        prefix cache of another); lengths are unchanged, every word being one token."""
        word = self.builder.words[salt % len(self.builder.words)]
        out = []
        for r in requests:
            text = r.messages[0]["content"][-1]["text"]
            text = " ".join([word, *text.split(" ")[1:]])
            out.append(ChatRequest([{"role": "user", "content": [{"type": "text",
                                                                  "text": text}]}],
                                   r.max_tokens, r.prompt_len))
        return out


# ==== offline ================================================================================


@dataclass
class OfflineRun:
    wall_s: float
    output_tokens: int
    texts: list[str]
    cpu: SchedTimes

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def run_offline(model_dir: Path, requests: list[ChatRequest], warm: list[ChatRequest],
                options: dict[str, Any]) -> OfflineRun:
    """One timed ``LLM.chat`` over every request (images decoded and preprocessed inside it,
    as the server does) after the warm-up requests."""
    llm = LLM(str(model_dir), **options)
    try:
        llm.chat([r.messages for r in warm], _params(warm), use_tqdm=False)
        gc.collect()
        clock = CPUClock({"offline": os.getpid()})
        with clock.measure() as cpu:
            start = time.perf_counter()
            outputs = llm.chat([r.messages for r in requests], _params(requests),
                               use_tqdm=False)
            wall = time.perf_counter() - start
    finally:
        llm.shutdown()
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    short = [i for i, (n, r) in enumerate(zip(tokens, requests)) if n != r.max_tokens]
    if short:
        raise RuntimeError(f"offline requests {short[:5]} did not produce their max_tokens")
    return OfflineRun(wall, sum(tokens), [o.outputs[0].text for o in outputs], cpu["offline"])


def _params(requests: Sequence[ChatRequest]) -> list[SamplingParams]:
    return [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            for r in requests]


# ==== report =================================================================================


def ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if len(values) else float("nan")


def latency_summary(results: Sequence[StreamResult], steady: bool = False) -> dict[str, float]:
    """TTFT and ITL percentiles; ``steady``: ITL within ``steady_window`` only."""
    if steady:
        window = steady_window(results)
        itls = [x for r in results for x in r.itls_within(*window)]
    else:
        itls = [x for r in results for x in r.itls]
    ttfts = [r.ttft for r in results]
    return {"ttft_p50_ms": ms(ttfts, 50), "ttft_p99_ms": ms(ttfts, 99),
            "itl_p50_ms": ms(itls, 50), "itl_p99_ms": ms(itls, 99),
            "itl_max_ms": ms(itls, 100), "itl_samples": len(itls)}


def describe(requests: Sequence[ChatRequest]) -> str:
    prompts = [r.prompt_len for r in requests]
    outputs = [r.max_tokens for r in requests]
    images = sum(1 for r in requests if len(r.messages[0]["content"]) > 1)
    return (f"{len(requests)} requests ({images} with an image), prompts "
            f"{min(prompts)}-{max(prompts)} tokens (mean {np.mean(prompts):.0f}), outputs "
            f"{min(outputs)}-{max(outputs)} (mean {np.mean(outputs):.0f}, {sum(outputs)} "
            "tokens)")


def _cpu_json(used: dict[str, SchedTimes]) -> dict[str, dict[str, float]]:
    return {name: {"run_s": t.run_s, "wait_s": t.wait_s} for name, t in used.items()}


def report_throughput(requests: Sequence[ChatRequest], offline: OfflineRun,
                      results: Sequence[StreamResult], wall: float,
                      cpu: dict[str, SchedTimes], concurrency: int,
                      target: float) -> dict[str, Any]:
    tokens = sum(r.completion_tokens for r in results)
    short = [i for i, (res, req) in enumerate(zip(results, requests))
             if res.completion_tokens != req.max_tokens]
    if short:
        raise RuntimeError(f"HTTP requests {short[:5]} did not produce their max_tokens")
    http_tps = tokens / wall
    ratio = http_tps / offline.tokens_per_s
    same = sum(1 for a, b in zip(offline.texts, results) if a == b.text)
    lat = latency_summary(results)
    print(f"\n== throughput: {describe(requests)}")
    print(f"  offline LLM.chat   {offline.wall_s:8.1f} s {offline.tokens_per_s:9.1f} tok/s")
    print(f"  HTTP, {concurrency:3d} streams {wall:8.1f} s {http_tps:9.1f} tok/s")
    print(f"  HTTP / offline: {ratio:.3f} (target >= {target:.2f}); identical texts "
          f"{same}/{len(results)}")
    print(f"  HTTP TTFT p50 {lat['ttft_p50_ms']:.0f} ms, p99 {lat['ttft_p99_ms']:.0f} ms; "
          f"ITL p50 {lat['itl_p50_ms']:.1f} ms, p99 {lat['itl_p99_ms']:.1f} ms, max "
          f"{lat['itl_max_ms']:.1f} ms ({lat['itl_samples']} intervals)")
    print(f"  CPU s (waiting for a CPU s): offline process {offline.cpu.run_s:.1f} "
          f"({offline.cpu.wait_s:.1f}); HTTP: {format_cpu(cpu)}")
    summary = {"description": describe(requests), "offline_tok_s": offline.tokens_per_s,
               "offline_wall_s": offline.wall_s, "http_tok_s": http_tps, "http_wall_s": wall,
               "ratio": ratio, "identical_texts": same, "concurrency": concurrency,
               "offline_cpu": _cpu_json({"offline": offline.cpu}), "http_cpu": _cpu_json(cpu),
               **lat}
    engine = cpu["engine"]
    if engine.run_s > 0 and offline.cpu.run_s > 0:  # Linux scheduler statistics available
        idle = wall - engine.run_s - engine.wait_s
        offline_rate, engine_rate = offline.output_tokens / offline.cpu.run_s, tokens / engine.run_s
        print(f"  engine process idle (no work) {idle:.1f} s of {wall:.1f} s; output tokens "
              f"per CPU second: offline {offline_rate:.1f}, HTTP engine {engine_rate:.1f}, "
              f"ratio {engine_rate / offline_rate:.3f} (HTTP / offline where no process waits "
              "for a CPU and the API has a core of its own)")
        summary |= {"engine_idle_s": idle, "per_cpu_ratio": engine_rate / offline_rate}
    return summary


@dataclass
class ITLRun:
    name: str
    results: list[StreamResult]
    cpu: dict[str, SchedTimes]
    image_latencies: list[float] = field(default_factory=list)
    image_wall_s: float = 0.0
    # The control: images decoded and preprocessed outside the server, this many per second.
    outside_rate: float | None = None

    @property
    def summary(self) -> dict[str, float]:
        return latency_summary(self.results, steady=True)


def report_interference(requests: Sequence[ChatRequest], runs: Sequence[ITLRun],
                        image_clients: int, image_size: tuple[int, int]) -> dict[str, Any]:
    print(f"\n== ITL of text streams, alone and beside image requests: {describe(requests)}, "
          f"all at once, with logprobs (one chunk per token); {image_clients} image clients, "
          f"{image_size[1]}x{image_size[0]} JPEG, max_tokens 1. ITL while every text stream "
          "decodes (from the last first token to the first last token)")
    print(f"  {'run':<30} {'ITL p50':>9} {'p99':>9} {'max':>9}  {'engine CPU (waited)':>19} "
          f"{'API CPU':>8}  image requests")
    out: dict[str, Any] = {"runs": {}}
    for run in runs:
        s = run.summary
        images = ""
        if run.image_latencies:
            rate = len(run.image_latencies) / run.image_wall_s
            images = (f"{len(run.image_latencies)} done, {rate:.1f}/s, mean "
                      f"{np.mean(run.image_latencies) * 1000:.0f} ms")
        if run.outside_rate is not None:
            images = f"none; {run.outside_rate:.1f} images/s prepared outside the server"
        engine, api = run.cpu["engine"], run.cpu["API"]
        print(f"  {run.name:<30} {s['itl_p50_ms']:7.1f}ms {s['itl_p99_ms']:7.1f}ms "
              f"{s['itl_max_ms']:7.1f}ms  {engine.run_s:9.1f}s ({engine.wait_s:5.1f}s) "
              f"{api.run_s:7.1f}s  {images}")
        out["runs"][run.name] = {**s, "image_requests": len(run.image_latencies),
                                 "image_wall_s": run.image_wall_s,
                                 "outside_rate": run.outside_rate, "cpu": _cpu_json(run.cpu)}
    alone = [r.summary["itl_p99_ms"] for r in runs
             if not r.image_latencies and r.outside_rate is None]
    loaded = [r.summary["itl_p99_ms"] for r in runs if r.image_latencies]
    ratio = float(np.mean(loaded) / np.mean(alone))
    print(f"  p99 ITL with images / text alone: {ratio:.3f}, means over the runs (target: no "
          "growth)")
    # Each loaded run against the text-only runs just before and after it: a machine whose
    # speed drifts during the benchmark (other tenants) moves both alike.
    p99 = [r.summary["itl_p99_ms"] for r in runs]

    def beside(i: int) -> float:
        return float(p99[i] / np.mean([p99[i - 1], p99[i + 1]]))

    paired = [beside(i) for i in range(1, len(runs) - 1) if runs[i].image_latencies]
    print(f"  the same, each loaded run against the text-only runs beside it: "
          f"{', '.join(f'{r:.3f}' for r in paired)}")
    out["p99_ratios_paired"] = paired
    outside = [i for i, r in enumerate(runs) if r.outside_rate is not None]
    if outside:
        out["outside_p99_ratio"] = beside(outside[0])
        print(f"  p99 ITL beside the same image work outside the server / the text-only runs "
              f"beside it: {out['outside_p99_ratio']:.3f} (the machine's share of the growth)")
    for run in runs:
        print(f"  CPU s (waiting for a CPU s), {run.name}: {format_cpu(run.cpu)}")
    out["p99_ratio"] = ratio
    return out


def print_profile(path: Path, limit: int) -> None:
    if not path.is_file():
        print(f"\n(no profile was written to {path})")
        return
    print(f"\n-- profile of the API process's event loop thread ({path}), top {limit} by own "
          "time")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(limit)


# ==== main ===================================================================================


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(PROMPT_TEMPLATES), default="llava-1.5")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the bench checkpoint is kept (built there if missing); "
                        "default a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the offline LLM and of the server's processes "
                        "(OMP_NUM_THREADS); default torch's own choice here")
    p.add_argument("--num-requests", type=int, default=128,
                   help="throughput requests (0: skip the throughput comparison)")
    p.add_argument("--concurrency", type=int, default=64, help="streaming HTTP clients")
    p.add_argument("--prompt-len", type=parse_range, default=(16, 256),
                   help="words (one token each) per prompt, LOW:HIGH")
    p.add_argument("--output-len", type=parse_range, default=(16, 256))
    p.add_argument("--image-every", type=int, default=4,
                   help="every N-th throughput request has an image (0: none)")
    p.add_argument("--image-size", type=parse_range, default=(224, 1024),
                   help="throughput images' height and width, each drawn from LOW:HIGH")
    p.add_argument("--itl-streams", type=int, default=32, help="text streams (0: skip)")
    p.add_argument("--itl-prompt-len", type=parse_range, default=(16, 128))
    p.add_argument("--itl-output-len", type=parse_range, default=(192, 256))
    p.add_argument("--itl-rounds", type=int, default=1,
                   help="loaded runs, each followed by a text-only one (a busy machine "
                        "needs several)")
    p.add_argument("--image-clients", type=int, default=4)
    p.add_argument("--image-variants", type=int, default=4,
                   help="distinct pictures the image clients send (each also both ways)")
    p.add_argument("--itl-image-size", type=parse_range, default=(1500, 2000),
                   help="HEIGHT:WIDTH of the image clients' pictures")
    p.add_argument("--outside-control", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the text streams beside the image load's decoding and "
                        "preprocessing done in a process outside the server, at the same rate")
    p.add_argument("--image-cache", default="0",
                   help="the server's --image-cache (default 0: every image request is decoded "
                        "and preprocessed; the server's default keeps images sent again)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", default=None, help="e.g. 4GiB (engine default if unset)")
    p.add_argument("--target", type=float, default=0.90, help="HTTP / offline tokens/s")
    p.add_argument("--profile-api", type=Path, default=None,
                   help="run the server's API process under cProfile, written here (slows it)")
    p.add_argument("--profile-lines", type=int, default=30)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="caldera-serving-bench-") as tmp:
        workdir = Path(tmp)
        image_dir = workdir / "images"
        image_dir.mkdir()
        model_dir = ensure_checkpoint(args.model_dir or workdir / args.shape, args.shape)
        image_port = free_port()
        image_url = f"http://127.0.0.1:{image_port}"
        with subprocess_at([sys.executable, "-m", "http.server", str(image_port), "--bind",
                            "127.0.0.1", "--directory", str(image_dir)],
                           image_url + "/", workdir / "image-server.log", timeout=60):
            summary = _run(args, threads, model_dir, workdir, ChatWorkloads(
                model_dir, args.shape, args.seed, image_dir, image_url))
    if args.profile_api is not None:
        print_profile(args.profile_api, args.profile_lines)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def _run(args: argparse.Namespace, threads: int, model_dir: Path, workdir: Path,
         loads: ChatWorkloads) -> dict[str, Any]:
    requests, warm, texts, image_requests = _workloads(args, loads)
    longest = max(r.prompt_len + r.max_tokens for r in [*requests, *texts, *image_requests])
    options: dict[str, Any] = {
        "dtype": "float32", "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": -(-(longest + 1) // 256) * 256, "block_size": args.block_size,
        "seed": args.seed,
    }
    if args.kv_cache_memory is not None:
        options["kv_cache_memory"] = args.kv_cache_memory
    config = loads.builder.config
    print(f"checkpoint: {args.shape} shape, {config.text.hidden_size}-wide "
          f"{config.text.num_layers}-layer language model, {config.vision.num_layers}-layer "
          f"vision tower; engine options {options}; torch threads {threads} in the offline "
          f"LLM and in the server's processes (OMP_NUM_THREADS={threads})")
    sys.stdout.flush()
    summary: dict[str, Any] = {"engine_options": options, "threads": threads}
    offline = run_offline(model_dir, requests, warm, options) if requests else None
    gc.collect()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server_options = {**options, "image_cache": args.image_cache}
    with subprocess_at(server_command(model_dir, port, server_options, args.profile_api),
                       base_url + "/health", workdir / "server.log",
                       env={"OMP_NUM_THREADS": str(threads)}) as server:
        # Without /proc the CPU figures read zero (pid 0 has no entry there).
        engine = engine_pid(server.pid) or 0
        workers = {f"image worker {i}": pid
                   for i, pid in enumerate(image_worker_pids(server.pid), 1)}
        clock = CPUClock({"engine": engine, "API": server.pid, **workers,
                          "clients": os.getpid()})
        run_async(run_closed_loop(base_url, [r.body() for r in warm], len(warm)))
        if offline is not None:
            with clock.measure() as cpu:
                results, wall = run_async(run_closed_loop(
                    base_url, [r.body() for r in requests], args.concurrency))
            summary["throughput"] = report_throughput(requests, offline, results, wall, cpu,
                                                      args.concurrency, args.target)
            sys.stdout.flush()
        if texts:
            runs = run_interference(args, base_url, clock, loads, texts, image_requests,
                                    workdir, model_dir)
            summary["interference"] = report_interference(
                texts, runs, args.image_clients, args.itl_image_size)
    return summary


def _workloads(args: argparse.Namespace, loads: ChatWorkloads) -> tuple[list[ChatRequest], ...]:
    """(throughput requests, warm-up requests, ITL text streams, image-load requests)."""
    requests = loads.build("throughput", args.num_requests, args.prompt_len, args.output_len,
                           args.image_size, args.image_every)
    warm = loads.build("warm-up", 2, (8, 16), (4, 4), (336, 400), 2)
    texts = loads.build("itl", args.itl_streams, args.itl_prompt_len, args.itl_output_len,
                        None, 0)
    height, width = args.itl_image_size
    pictures = [random_image(np.random.default_rng([args.seed, k]), height, width)
                for k in range(args.image_variants)]
    image_requests = [loads.request(_image_load_text(loads, args.block_size, (height, width)),
                                    loads.add_image(p, inline), (height, width), 1)
                      for p in pictures for inline in (True, False)]
    return requests, warm, texts, image_requests


def _image_load_text(loads: ChatWorkloads, block_size: int, size: tuple[int, int]) -> str:
    """Words to follow the image-load requests' picture: at least 32 (so that the prefix cache
    covers the whole image and a repeated picture needs no encoder run) and as many as make
    the prompt one token past a block boundary (the cache then leaves just that token for the
    engine to compute: with max_tokens 1, one token of engine work per image request)."""
    words = loads.build("image-load", 1, (32 + block_size, 32 + block_size), (1, 1), None, 0)
    text = words[0].messages[0]["content"][-1]["text"].split(" ")
    for count in range(32, 32 + block_size):
        candidate = " ".join(text[:count])
        if loads.request(candidate, "", size, 1).prompt_len % block_size == 1:
            return candidate
    return " ".join(text[:32])


def run_interference(args: argparse.Namespace, base_url: str, clock: CPUClock,
                     loads: ChatWorkloads, texts: list[ChatRequest],
                     image_requests: list[ChatRequest], workdir: Path,
                     model_dir: Path) -> list[ITLRun]:
    """Text alone, then ``--itl-rounds`` times: text beside the image load, text alone again;
    then (``--outside-control``) text beside the same image work done outside the server, at
    the loaded runs' image rate, and alone once more. Every run has its own salt (first word),
    so none reuses another's prefix cache."""
    salts = iter(range(1, 1000))

    def text_alone(name: str) -> ITLRun:
        bodies = [r.body(logprobs=True) for r in loads.salted(texts, next(salts))]
        with clock.measure() as cpu:
            results = run_async(run_text_streams(base_url, bodies))
        return ITLRun(name, results, cpu)

    def with_images(name: str) -> ITLRun:
        bodies = [r.body(logprobs=True) for r in loads.salted(texts, next(salts))]
        with image_load(base_url, image_bodies, args.image_clients, workdir) as (start, load):
            loaded_clock = CPUClock({**clock.pids, "image clients": load["pid"]})
            with loaded_clock.measure() as cpu:
                results = run_async(run_text_streams(base_url, bodies, start))
        return ITLRun(name, results, cpu, load["latencies"], load["wall_s"])

    runs = [text_alone("text alone")]
    image_bodies = [r.body(stream=False) for r in image_requests]
    # Each picture once, both ways, so the loaded runs find their prefill in the cache.
    run_async(run_closed_loop(base_url, [r.body() for r in image_requests], 1))
    for round_ in range(1, args.itl_rounds + 1):
        suffix = f" ({round_})" if args.itl_rounds > 1 else ""
        runs.append(with_images(f"with {args.image_clients} image clients{suffix}"))
        runs.append(text_alone(f"text alone, again{suffix}"))
    if args.outside_control:
        rate = float(np.mean([len(r.image_latencies) / r.image_wall_s
                              for r in runs if r.image_latencies]))
        urls = [r.messages[0]["content"][0]["image_url"]["url"] for r in image_requests]
        pictures = [base64.b64decode(u.split(",", 1)[1]) for u in urls if u.startswith("data:")]
        bodies = [r.body(logprobs=True) for r in loads.salted(texts, next(salts))]
        with image_work_outside(model_dir, pictures, rate, workdir) as (start, work):
            control_clock = CPUClock({**clock.pids, "image work outside": work["pid"]})
            with control_clock.measure() as cpu:
                results = run_async(run_text_streams(base_url, bodies, start))
        runs.append(ITLRun("same image work, outside", results, cpu,
                           outside_rate=work["images"] / work["wall_s"]))
        runs.append(text_alone("text alone, last"))
    return runs


if __name__ == "__main__":
    main()
