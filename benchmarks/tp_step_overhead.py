"""What one decode step costs with tensor parallelism over Ray on CPU, split into compute,
collectives and Ray overhead, beside the in-process executor on the same requests.

    python -m caldera.benchmarks.tp_step_overhead [--batch 8] [--steps 64] [--threads 1]

Both engines decode the same batch of greedy requests on the bench model shape. Per step:

- TP=1, in-process: the executor call is all compute.
- TP=2, two Ray actors over gloo: the driver times its executor call; each rank times its own
  step and the collectives inside it (kept by the rank and read once at the end). Ray/IPC
  overhead = driver time - the slowest rank's step (pickling the step, writing it to each
  rank's step connection, waking the ranks, and rank 0's output back).

The last lines time the transport alone (two echo actors, no model) for the same scheduler
output, three ways: the executor's step connections, a Ray compiled graph (driver -> both
actors -> driver, the step as pickled bytes), and ``ray.put`` plus one actor call per rank;
and the CPU the echo actors burn while they wait for a step, on the first two.
Medians over the timed steps; ranks run one torch thread each (``--threads`` sets TP=1's).
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
import torch

from caldera.engine.config import EngineConfig
from caldera.engine.core import EngineCore
from caldera.engine.demo_checkpoints import BENCH_SIZES, build_tiny_checkpoint
from caldera.engine.messages import EngineCoreRequest
from caldera.scheduler.output import SamplingParams, SchedulerOutput
from caldera.worker.step_channel import RankChannel, StepChannel


def _requests(batch: int, prompt_len: int) -> list[EngineCoreRequest]:
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    return [EngineCoreRequest(f"r{i}", torch.randint(3, 32000, (prompt_len,),
                                                      generator=generator).tolist(), params)
            for i in range(batch)]


def run_engine(model_dir: Path, tp: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per decode step: executor call, and for TP > 1 the ranks' split."""
    core = EngineCore(EngineConfig(model=str(model_dir), tensor_parallel_size=tp,
                                   max_model_len=1024, kv_cache_memory="256MiB",
                                   max_num_seqs=args.batch))
    for request in _requests(args.batch, args.prompt_len):
        core.add_request(request)
    ray_executor = tp > 1
    calls, timed = [], []
    try:
        if ray_executor:
            core.executor.take_step_times()  # from the first step on
        for step in range(args.warmup + args.steps):
            out = core.scheduler.schedule()
            start = time.perf_counter()
            runner_output = core.executor.execute_model(out)
            calls.append(time.perf_counter() - start)
            core.scheduler.update_from_output(out, runner_output)
            # Prefill steps and warm-up are not timed.
            timed.append(step >= args.warmup and not out.scheduled_new_reqs)
        call_times = [c for c, keep in zip(calls, timed) if keep]
        result = {"call": statistics.median(call_times)}
        if ray_executor:
            # The ranks' times, asked for once now: a call between steps would wake every
            # process in the middle of what is measured.
            per_rank = core.executor.take_step_times()
            assert all(len(times) == len(calls) for times in per_rank)
            slowest = [max(times[i].step_seconds for times in per_rank)
                       for i, keep in enumerate(timed) if keep]
            collectives = [max(times[i].collective_seconds for times in per_rank)
                           for i, keep in enumerate(timed) if keep]
            result["rank"] = statistics.median(slowest)
            result["collectives"] = statistics.median(collectives)
            result["overhead"] = statistics.median(c - s for c, s in zip(call_times, slowest))
        return result
    finally:
        core.shutdown()


@ray.remote(num_cpus=1, concurrency_groups={"channel": 1, "probe": 1})
class _Echo:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def step(self, step: tuple | bytes | bytearray) -> bytes | None:
        if isinstance(step, bytes | bytearray):  # as the executor sends it
            step = pickle.loads(step)
        return pickle.dumps(len(step[0].num_scheduled_tokens)) if self.rank == 0 else None

    @ray.method(concurrency_group="channel")
    def serve(self, address: tuple[str, int], token: bytes) -> None:
        channel = RankChannel(address, token, self.rank)
        while (payload := channel.receive()) is not None:
            output = self.step(payload)
            if output is not None:
                channel.send_output(output)
        channel.close()

    @ray.method(concurrency_group="probe")
    def cpu_seconds(self) -> float:
        """CPU time of the whole actor process (all its threads) so far."""
        return time.process_time()


def run_transport(scheduler_output: SchedulerOutput, rounds: int,
                  idle_seconds: float = 2.0) -> dict[str, float]:
    """Median round trip of one step's input to two echo actors and back, and the CPU the
    actors spend (per second, both together) left ``idle_seconds`` waiting for a step."""
    from ray.dag import InputNode, MultiOutputNode

    def timed(round_trip: Callable[[], object]) -> float:
        for _ in range(8):  # warm-up
            round_trip()
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            round_trip()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def idle_cpu() -> float:
        before = sum(ray.get([a.cpu_seconds.remote() for a in actors]))
        time.sleep(idle_seconds)
        return (sum(ray.get([a.cpu_seconds.remote() for a in actors])) - before) / idle_seconds

    step = (scheduler_output, None)
    actors = [_Echo.remote(rank) for rank in range(2)]
    channel = StepChannel("127.0.0.1", len(actors))
    serving = [a.serve.remote(channel.address, channel.token) for a in actors]
    try:
        channel.accept(60, lambda: None)

        def through_connections() -> object:
            channel.broadcast(pickle.dumps(step, pickle.HIGHEST_PROTOCOL))
            return pickle.loads(channel.receive(lambda: None))

        result = {"connections": timed(through_connections), "connections_idle": idle_cpu()}
        channel.close()
        ray.get(serving)
        result["plain"] = timed(lambda: ray.get([a.step.remote(ray.put(step)) for a in actors]))
        with InputNode() as node:
            graph = MultiOutputNode([a.step.bind(node) for a in actors]).experimental_compile()
        try:
            result["compiled"] = timed(lambda: ray.get(
                graph.execute(pickle.dumps(step, pickle.HIGHEST_PROTOCOL)), timeout=-1))
            result["compiled_idle"] = idle_cpu()
        finally:
            graph.teardown()
        return result
    finally:
        channel.close()
        for actor in actors:
            ray.kill(actor)


def _decode_step(model_dir: Path, args: argparse.Namespace) -> SchedulerOutput:
    """A decode step's scheduler output for the batch (from a scheduler alone, no model)."""
    core_config = EngineConfig(model=str(model_dir), max_model_len=1024,
                               kv_cache_memory="256MiB", max_num_seqs=args.batch)
    core = EngineCore(core_config)
    try:
        for request in _requests(args.batch, args.prompt_len):
            core.add_request(request)
        core.step()
        return core.scheduler.schedule()
    finally:
        core.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="requests decoding together")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of TP=1")
    parser.add_argument("--model-dir", type=Path)
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None or not (model_dir / "config.json").exists():
        model_dir = model_dir or Path(tempfile.mkdtemp(prefix="caldera-bench-"))
        build_tiny_checkpoint("llava-1.5", model_dir, **BENCH_SIZES)
    torch.set_num_threads(args.threads)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    ms = 1e3
    try:
        tp1 = run_engine(model_dir, 1, args)
        tp2 = run_engine(model_dir, 2, args)
        print(f"decode steps of {args.batch} requests, bench shape "
              f"({BENCH_SIZES['hidden_size']}-wide, {BENCH_SIZES['num_layers']} layers), "
              f"float32 on CPU, median of {args.steps} steps, ms per step")
        print(f"{'executor':<26}{'step':>8}{'rank compute':>14}{'collectives':>13}"
              f"{'Ray/IPC overhead':>18}")
        print(f"{'in-process, TP=1':<26}{tp1['call'] * ms:>8.2f}{tp1['call'] * ms:>14.2f}"
              f"{0.0:>13.2f}{0.0:>18.2f}")
        compute = tp2["rank"] - tp2["collectives"]
        print(f"{'Ray actors, TP=2':<26}{tp2['call'] * ms:>8.2f}{compute * ms:>14.2f}"
              f"{tp2['collectives'] * ms:>13.2f}{tp2['overhead'] * ms:>18.2f}", flush=True)
        transport = run_transport(_decode_step(model_dir, args), args.steps)
        print(f"transport only (2 echo actors, this step's scheduler output): step connections "
              f"{transport['connections'] * ms:.2f} ms, Ray compiled graph "
              f"{transport['compiled'] * ms:.2f} ms, ray.put + one call per rank "
              f"{transport['plain'] * ms:.2f} ms")
        print(f"CPU the two echo actors burn waiting for a step: step connections "
              f"{transport['connections_idle']:.2f} s/s, Ray compiled graph "
              f"{transport['compiled_idle']:.2f} s/s")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
