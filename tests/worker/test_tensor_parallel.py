"""Tensor parallelism over Ray: two CPU worker actors on gloo give the tokens one process gives,
and a worker that dies fails its engine's requests instead of hanging them.

The split itself (head ranges, quantized shards) is checked first without any process; the
engine tests share the session's Ray runtime and start as few engines as they can, since each
start spawns two worker processes.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from support import make_image

from caldera.engine import LLM, SamplingParams
from caldera.worker.config import ModelConfig
from caldera.worker.isq import quantize_int4, quantize_int8
from caldera.worker.tensor_parallel import (
    ColumnParallelLinear,
    TensorParallelError,
    check_tensor_parallel,
    local_heads,
)

# ---- the split, without processes -----------------------------------------------------------


def test_heads_split_and_kv_heads_replicate_below_the_rank_count(tiny_checkpoint):
    text = ModelConfig.from_model_dir(tiny_checkpoint("llava-next-mistral")).text  # 4 q, 2 kv
    assert [local_heads(text, r, 2) for r in range(2)] == [(range(0, 2), range(0, 1)),
                                                           (range(2, 4), range(1, 2))]
    # 4 ranks over 2 KV heads: each KV head on the two ranks whose query heads use it.
    assert [local_heads(text, r, 4)[1] for r in range(4)] == [range(0, 1), range(0, 1),
                                                              range(1, 2), range(1, 2)]
    config = ModelConfig.from_model_dir(tiny_checkpoint("llava-next-mistral"))
    with pytest.raises(TensorParallelError, match="4 attention heads"):
        check_tensor_parallel(config, 3)
    # o_proj holds 128 / 2 = 64 input features per rank: int4 groups of 128 would straddle.
    with pytest.raises(TensorParallelError, match="isq_group_size that divides 64"):
        check_tensor_parallel(config, 2, isq_group_size=128)
    check_tensor_parallel(config, 2, isq_group_size=64)


def test_quantized_shards_are_slices_of_the_unsplit_quantization():
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_int8(weight)
    halves = weight[:, :128], weight[:, 128:]
    amax = torch.maximum(*(h.abs().amax(dim=1) for h in halves))
    for i, half in enumerate(halves):  # a row-parallel shard: scales span the whole row
        q_half, s_half = quantize_int8(half, reduce_max=lambda local: torch.maximum(local, amax))
        assert torch.equal(q_half, q[:, i * 128:(i + 1) * 128]) and torch.equal(s_half, scales)
    q4, s4, z4 = quantize_int4(weight, 64)
    for i, half in enumerate(halves):  # groups of 64 never straddle the two halves
        hq, hs, hz = quantize_int4(half, 64)
        assert torch.equal(hq, q4[:, i * 64:(i + 1) * 64])
        assert torch.equal(hs, s4[:, i * 2:(i + 1) * 2]) and torch.equal(hz, z4[:, i * 2:(i + 1) * 2])


class _RecordingSlice:
    """A stand-in for safetensors' lazy slice that records what is read."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.reads = tensor, []

    def get_shape(self) -> list[int]:
        return list(self.tensor.shape)

    def __getitem__(self, index):
        self.reads.append(index)
        return self.tensor[index]


def test_a_column_shard_reads_only_its_rows():
    full = torch.randn(8, 4)
    with torch.device("meta"):
        layer = ColumnParallelLinear(4, 8, 2, 6, bias=False)
    view = _RecordingSlice(full)
    layer.load_weight("weight", view, torch.float32, torch.device("cpu"))
    assert view.reads == [slice(2, 6)]
    assert torch.equal(layer.linear.weight, full[2:6])


# ---- engines on the session's Ray runtime ---------------------------------------------------

ENGINE = dict(max_model_len=2048, kv_cache_memory="8MiB", max_num_seqs=8)
IMAGE_PROMPT = {"llava-1.5": "USER: <image>\nWhat is shown here? ASSISTANT:",
                "llava-next-mistral": "[INST] <image>\nWhat is shown here? [/INST]"}


def _outputs(llm: LLM, shape: str) -> list[tuple[list[int], list[float] | None]]:
    """Greedy (with logprobs) and seeded outputs of an image prompt and two text prompts."""
    prompts = [{"prompt": IMAGE_PROMPT[shape], "images": [make_image(90, 120)]},
               "The quick brown fox", "1 2 3 4 5"]
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    results = []
    for params in (greedy, seeded):
        for out in llm.generate(prompts, params, use_tqdm=False):
            completion = out.outputs[0]
            lps = ([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)]
                   if completion.logprobs else None)
            results.append((list(completion.token_ids), lps))
    return results


def _assert_same(tp2: list, tp1: list) -> None:
    for (ids2, lps2), (ids1, lps1) in zip(tp2, tp1, strict=True):
        assert ids2 == ids1
        if lps1 is not None:
            assert lps2 == pytest.approx(lps1, abs=1e-4)


def _reference(path: Path, shape: str, isq: str | None) -> list:
    llm = LLM(str(path), isq=isq, **ENGINE)
    try:
        return _outputs(llm, shape)
    finally:
        llm.shutdown()


def test_tp2_gives_the_tokens_of_tp1_multi_head(ray_runtime, llava15_dir):
    expected = _reference(llava15_dir, "llava-1.5", None)
    llm = LLM(str(llava15_dir), tensor_parallel_size=2, **ENGINE)
    try:
        executor = llm.engine.core.executor
        assert [r.rank for r in executor.ranks] == [0, 1]
        assert len({r.pid for r in executor.ranks} | {os.getpid()}) == 3
        _assert_same(_outputs(llm, "llava-1.5"), expected)
    finally:
        llm.shutdown()


def test_tp2_grouped_query_then_a_worker_killed_mid_generation(ray_runtime, next_mistral_dir):
    expected = _reference(next_mistral_dir, "llava-next-mistral", None)
    llm = LLM(str(next_mistral_dir), tensor_parallel_size=2, **ENGINE)
    try:
        _assert_same(_outputs(llm, "llava-next-mistral"), expected)
        from caldera.worker.executor import WorkerError

        victim = llm.engine.core.executor.ranks[1]
        started, failure = threading.Event(), {}

        def generate() -> None:
            params = SamplingParams(temperature=0, max_tokens=900, ignore_eos=True)
            try:
                for _ in llm.stream_chat([{"role": "user", "content": "go on"}], params):
                    started.set()
            except Exception as exc:  # what the caller of the pending request sees
                failure["error"] = exc
            started.set()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        assert started.wait(60)
        os.kill(victim.pid, signal.SIGKILL)
        thread.join(timeout=10)
        assert not thread.is_alive(), "the pending request hangs after its worker died"
        error = failure.get("error")
        assert isinstance(error, WorkerError), error
        assert f"rank 1 (node {victim.node_ip}, pid {victim.pid})" in str(error)
        with pytest.raises(WorkerError, match="rank 1"):  # later requests fail at once
            llm.generate("again", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()


def _worker_pids() -> list[int]:
    """Ray worker actors of this test session: ``ray::RayWorker`` processes descending from
    this process (the session's Ray runtime is its child)."""
    def parent(pid: int) -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[1])

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::RayWorker"):
                continue
            pid = int(entry.name)
            while pid > 1 and pid != os.getpid():
                pid = parent(pid)
        except (OSError, ValueError, IndexError):
            continue
        if pid == os.getpid():
            found.append(int(entry.name))
    return found


def test_tp2_kv_heads_replicated_int8_engine_process_then_idle_death(ray_runtime,
                                                                       tiny_checkpoint):
    """Fewer KV heads than ranks, ISQ int8, the engine in its own process (joining the
    session's Ray through RAY_ADDRESS): same tokens, and a worker that dies while the engine
    is idle turns the engine dead within 5 s, each request after that failing at once."""
    from caldera.engine.core_client import EngineDeadError

    path = tiny_checkpoint("llava-next-mistral", num_kv_heads=1)
    expected = _reference(path, "llava-next-mistral", "8")
    before = set(_worker_pids())
    llm = LLM(str(path), isq="8", tensor_parallel_size=2, multiprocess=True, **ENGINE)
    try:
        _assert_same(_outputs(llm, "llava-next-mistral"), expected)
        workers = sorted(set(_worker_pids()) - before)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        deadline = time.monotonic() + 5
        with pytest.raises(EngineDeadError, match="tensor-parallel rank"):
            while time.monotonic() < deadline:
                llm.engine.get_output(timeout=0.2)
        with pytest.raises(EngineDeadError):
            llm.generate("again", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()


def test_a_rank_failing_at_startup_fails_the_start_with_its_error(ray_runtime, llava15_dir):
    # 64 KiB of KV cache cannot hold one sequence: each rank refuses while sizing its cache.
    options = {**ENGINE, "kv_cache_memory": "64KiB"}
    with pytest.raises(ValueError, match=r"rank \d \(node .*KV cache budget"):
        LLM(str(llava15_dir), tensor_parallel_size=2, **options)
    _assert_cpus_free(ray_runtime)


def test_a_ray_client_address_is_refused_saying_what_to_use(monkeypatch):
    from caldera.worker.ray_executor import connect_ray

    with pytest.raises(ValueError, match="Ray Client address.*RAY_ADDRESS=auto"):
        connect_ray("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ValueError, match="Ray Client"):
        connect_ray(None)


def test_placement_gives_up_naming_what_is_missing(ray_runtime, llava15_dir):
    from caldera.worker.ray_executor import PlacementError

    with pytest.raises(PlacementError, match=r"4 workers with one CPU each.*2 CPU\(s\)"):
        LLM(str(llava15_dir), tensor_parallel_size=4, ray_placement_timeout=1, **ENGINE)
    _assert_cpus_free(ray_runtime)


def _assert_cpus_free(ray) -> None:
    """Every worker and placement group of a failed start is gone (Ray frees them shortly)."""
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2
