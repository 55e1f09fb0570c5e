"""RayExecutor: one Worker per tensor-parallel rank, each in its own Ray actor.

Start-up::

    connect        join RAY_ADDRESS / ray_address, or start a local Ray (dashboard off)
    place          one bundle per rank ({"GPU": 1} on CUDA, {"CPU": 1} on CPU) in a placement
                   group: the one this process runs in (a Ray Serve replica's, whose rank
                   bundles may hold other amounts of CPU), or a new one, waited for at most
                   ray_placement_timeout seconds
    rendezvous     rank 0 serves a TCPStore on a free port of its node; every rank joins the
                   torch.distributed group there (gloo on CPU, NCCL on CUDA)
    load           every rank loads its shard; the KV cache gets the fewest blocks any rank holds
    connect        every rank opens its step connection to the driver (step_channel.py) and
                   serves steps from it until the driver closes it

Each step the driver pickles ``(scheduler output, tokens sampled in the previous step)`` once
and writes the bytes to every rank's connection; rank 0 samples and answers with the step's
output, the other ranks answer only when they fail and append rank 0's tokens at the start of
the next step (so no collective is spent telling them). Ray stays out of the steps: a round
trip through its compiled graph took 0.55 ms on two CPU ranks and kept each rank polling a
core, the connections take 0.15 ms and nothing while idle (BENCHMARKS.md).

A thread pings every rank each second (the actors answer pings from their own thread, even
mid-step); a dead rank is reported by ``check_health`` and by the next ``execute_model`` (at
once, mid-step, when its connection closes), with its rank, node and process id.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import pickle
import threading
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from caldera.scheduler.output import ModelRunnerOutput, SchedulerOutput
from caldera.worker.executor import Executor, ParallelConfig, WorkerError
from caldera.worker.step_channel import RankChannel, RankFailed, StepChannel
from caldera.worker.worker import WorkerConfig

logger = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL = 1.0
# A rank that is alive but has not answered a ping for this long counts as failed.
HEALTH_CHECK_TIMEOUT = 30.0
# Environment a rank needs from the driver's: the collectives' network interfaces, Caldera's
# own switches.
FORWARDED_ENV = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG")
FORWARDED_ENV_PREFIX = "CALDERA_"

# (scheduler output, (request ids, sampled token ids) of the previous step)
Step = tuple[SchedulerOutput, tuple[list[str], list[list[int]]] | None]


class PlacementError(ValueError):
    """The cluster cannot host the workers; the message says which resources are missing."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    node_ip: str
    node_id: str
    pid: int

    def describe(self) -> str:
        return f"rank {self.rank} (node {self.node_ip}, pid {self.pid})"


# Steps whose times a rank keeps for take_step_times (the oldest go first).
STEP_TIMES_KEPT = 4096


@dataclass(frozen=True)
class StepTime:
    """Seconds one step took on a rank, and the collectives within it."""

    step_seconds: float
    collective_seconds: float


# ==== the actor ==============================================================================


@ray.remote(concurrency_groups={"health": 1})
class RayWorker:
    """One tensor-parallel rank. Steps run on the actor's main thread; pings on their own."""

    def __init__(self, rank: int, world_size: int, log_level: int) -> None:
        logging.basicConfig(level=log_level,
                            format="%(levelname)s %(asctime)s %(name)s: %(message)s")
        self.rank = rank
        self.world_size = world_size
        self.worker: Any = None
        self.store: Any = None
        self.times: collections.deque[StepTime] = collections.deque(maxlen=STEP_TIMES_KEPT)

    def info(self) -> RankInfo:
        context = ray.get_runtime_context()
        return RankInfo(self.rank, ray.util.get_node_ip_address(), context.get_node_id(),
                        os.getpid())

    def open_rendezvous(self) -> int:
        from caldera.worker.distributed import open_rendezvous

        self.store = open_rendezvous(ray.util.get_node_ip_address(), self.world_size)
        return self.store.port

    def start(self, config: WorkerConfig, host: str, port: int) -> int:
        """Joins the group and loads this rank's shard; returns the KV blocks it can hold."""
        from caldera.worker.distributed import init_tensor_parallel_group
        from caldera.worker.worker import Worker, resolve_device

        group = init_tensor_parallel_group(self.rank, self.world_size, host, port,
                                           resolve_device(config.device), self.store)
        self.worker = Worker(config, group)
        return self.worker.available_blocks()

    def initialize_cache(self, num_blocks: int) -> None:
        self.worker.initialize_cache(num_blocks)

    def serve_steps(self, address: tuple[str, int], token: bytes) -> None:
        """Connects to the engine and runs every step it sends, until it closes the
        connection: the pickled ``Step`` in, rank 0's pickled output back."""
        channel = RankChannel(address, token, self.rank)
        try:
            while (payload := channel.receive()) is not None:
                start = time.perf_counter()
                collectives = self.worker.group.collective_seconds
                try:
                    scheduler_output, previous = pickle.loads(payload)
                    if previous is not None and self.rank > 0:
                        self.worker.append_sampled(*previous)
                    output = self.worker.execute_model(scheduler_output)
                except Exception as exc:  # the engine stops every rank (some wait in a collective)
                    logger.exception("rank %d failed a step", self.rank)
                    channel.send_error(f"{self.info().describe()} failed a step: "
                                       f"{_describe(exc)}")
                    continue
                self.times.append(StepTime(time.perf_counter() - start,
                                           self.worker.group.collective_seconds - collectives))
                if output is not None:
                    channel.send_output(pickle.dumps(output, pickle.HIGHEST_PROTOCOL))
        finally:
            channel.close()

    @ray.method(concurrency_group="health")
    def ping(self) -> None:
        pass

    @ray.method(concurrency_group="health")
    def take_step_times(self) -> list[StepTime]:
        """Each step's times since the last call, oldest first (for the per-step overhead
        benchmark, which asks once at the end rather than between steps)."""
        # Popped one by one: a step may be appending from the main thread meanwhile.
        return [self.times.popleft() for _ in range(len(self.times))]


# ==== the executor ===========================================================================


class RayExecutor(Executor):
    def __init__(self, worker_config: WorkerConfig, parallel: ParallelConfig) -> None:
        self.parallel = parallel
        self.world_size = parallel.tensor_parallel_size
        self.workers: list[Any] = []
        self.ranks: list[RankInfo] = []
        self._channel: StepChannel | None = None
        self._serving: list[Any] = []
        self._placement: PlacementGroup | None = None
        self._owns_placement = False
        self._owns_ray = False
        self._previous: tuple[list[str], list[list[int]]] | None = None
        self._failure: str | None = None
        self._stop = threading.Event()
        self._health: threading.Thread | None = None
        try:
            self._start(worker_config)
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up -----------------------------------------------------------------------

    def _start(self, worker_config: WorkerConfig) -> None:
        self._owns_ray = connect_ray(self.parallel.ray_address)
        use_gpu = _wants_gpu(worker_config.device)
        config = dataclasses.replace(worker_config, device="cuda" if use_gpu else "cpu")
        self._placement, bundles = self._place(use_gpu)
        env = forwarded_env()
        for rank, bundle in enumerate(bundles):
            cpus = 0 if use_gpu else self._placement.bundle_specs[bundle]["CPU"]
            options = dict(
                num_cpus=cpus, num_gpus=1 if use_gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._placement, placement_group_bundle_index=bundle),
            )
            if env:
                options["runtime_env"] = {"env_vars": env}
            self.workers.append(RayWorker.options(**options).remote(
                rank, self.world_size, logging.getLogger("caldera").getEffectiveLevel()))
        self.ranks = self._gather([w.info.remote() for w in self.workers], "start")
        logger.info("tensor parallel over %d ranks: %s", self.world_size,
                    ", ".join(r.describe() for r in self.ranks))
        port = self._gather([self.workers[0].open_rendezvous.remote()], "open the rendezvous")[0]
        blocks = self._gather(
            [w.start.remote(config, self.ranks[0].node_ip, port) for w in self.workers],
            "load the model")
        self.num_blocks = min(blocks)
        self._gather([w.initialize_cache.remote(self.num_blocks) for w in self.workers],
                     "allocate the KV cache")
        self._open_channel()
        self._health = threading.Thread(target=self._watch, name="caldera-worker-health",
                                        daemon=True)
        self._health.start()

    def _place(self, use_gpu: bool) -> tuple[PlacementGroup, list[int]]:
        """The placement group and the bundle index of each rank."""
        resource = "GPU" if use_gpu else "CPU"
        current = _existing_placement_group(self.parallel.placement_group)
        if current is not None:
            return current, _bundles_for(current, resource, self.world_size)
        bundles = [{resource: 1.0} for _ in range(self.world_size)]
        group = placement_group(bundles, strategy="PACK", name="")
        self._owns_placement = True
        if not group.wait(self.parallel.placement_timeout):
            remove_placement_group(group)
            raise PlacementError(_missing_resources(resource, self.world_size,
                                                    self.parallel.placement_timeout))
        return group, list(range(self.world_size))

    def _open_channel(self) -> None:
        """Every rank connects to the engine for its steps (over loopback when all of them
        run on this node)."""
        here = ray.get_runtime_context().get_node_id()
        local = all(info.node_id == here for info in self.ranks)
        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        self._channel = StepChannel(host, self.world_size)
        self._serving = [w.serve_steps.remote(self._channel.address, self._channel.token)
                         for w in self.workers]
        self._channel.accept(self.parallel.placement_timeout, self._serving_failed)

    def _serving_failed(self) -> None:
        """Raises the error of a rank whose step loop ended (it never does while the engine
        holds its connection)."""
        done, _ = ray.wait(self._serving, num_returns=len(self._serving), timeout=0)
        for ref in done:
            rank = self._serving.index(ref)
            try:
                ray.get(ref)
            except RayError as exc:
                raise self._rank_error(rank, "failed to connect for steps", exc) from None
            raise WorkerError(f"tensor-parallel {self.ranks[rank].describe()} stopped "
                              f"serving steps")

    def _gather(self, refs: list[Any], what: str) -> list[Any]:
        """Results in rank order; the first rank to fail fails the whole start-up with its
        own error (the others may be waiting for it and are never waited for)."""
        pending = {ref: rank for rank, ref in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    results[rank] = ray.get(ref)
                except RayError as exc:
                    raise self._rank_error(rank, f"failed to {what}", exc) from None
        return results

    def _rank_error(self, rank: int, what: str, exc: BaseException) -> Exception:
        who = self.ranks[rank].describe() if rank < len(self.ranks) else f"rank {rank}"
        cause = _cause(exc)
        message = f"tensor-parallel {who} {what}: {_describe(cause)}"
        logger.error("%s", message)
        return ValueError(message) if isinstance(cause, ValueError) else WorkerError(message)

    # ---- steps --------------------------------------------------------------------------

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.check_health()
        assert self._channel is not None
        payload = pickle.dumps((scheduler_output, self._previous), pickle.HIGHEST_PROTOCOL)
        try:
            self._channel.broadcast(payload)
            result = self._channel.receive(self.check_health)
        except RankFailed as exc:
            raise self._fail(self._step_failure(exc)) from None
        output: ModelRunnerOutput = pickle.loads(result)
        self._previous = (output.req_ids, output.sampled_token_ids)
        return output

    def _step_failure(self, failure: RankFailed) -> str:
        """What went wrong in a failed step: a dead rank if there is one (the others then
        fail their collectives), else the rank that reported an error (naming itself)."""
        dead = self._dead_ranks()
        if dead:
            return dead
        if failure.message is not None:
            return f"tensor-parallel {failure.message}"
        return (f"tensor-parallel {self.ranks[failure.rank].describe()} closed its step "
                f"connection")

    def _dead_ranks(self) -> str | None:
        refs = [w.ping.remote() for w in self.workers]
        for info, ref in zip(self.ranks, refs):
            try:
                ray.get(ref, timeout=HEALTH_CHECK_TIMEOUT)
            except GetTimeoutError:
                return (f"tensor-parallel {info.describe()} has not answered a health check "
                        f"for {HEALTH_CHECK_TIMEOUT:.0f} s")
            except RayError as exc:
                return f"tensor-parallel {info.describe()} died: {_describe(_cause(exc))}"
        return None

    def check_health(self) -> None:
        if self._failure is not None:
            raise WorkerError(self._failure)

    def _watch(self) -> None:
        while not self._stop.wait(HEALTH_CHECK_INTERVAL):
            dead = self._dead_ranks()
            if dead is not None and not self._stop.is_set():
                self._fail(dead)
                return

    def _fail(self, message: str) -> WorkerError:
        """Records the first failure and stops every rank: the engine cannot go on, and a
        rank left waiting in a collective for a failed peer would never return."""
        if self._failure is None:
            self._failure = message
            logger.error("%s", message)
            for worker in self.workers:
                ray.kill(worker)
        return WorkerError(self._failure)

    def take_step_times(self) -> list[list[StepTime]]:
        """Per rank, each step's times since the last call (benchmarks)."""
        return ray.get([w.take_step_times.remote() for w in self.workers])

    # ---- shutdown -----------------------------------------------------------------------

    def shutdown(self) -> None:
        self._stop.set()
        if self._health is not None and self._health is not threading.current_thread():
            self._health.join(timeout=HEALTH_CHECK_TIMEOUT)
        if self._channel is not None:
            self._channel.close()  # the ranks' step loops end
            self._channel = None
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        if self._placement is not None and self._owns_placement:
            remove_placement_group(self._placement)
        self._placement = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False


# ==== helpers ================================================================================


def connect_ray(address: str | None) -> bool:
    """Joins ``address`` (or ``RAY_ADDRESS``), or starts a local Ray with the dashboard off;
    returns whether this call started it (so shutting down stops it). A process already
    connected stays on its cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("ray://"):
        raise ValueError(
            f"ray_address {address!r} is a Ray Client address: the engine drives its ranks "
            f"from a node of the cluster, so run it there with RAY_ADDRESS=auto (or the head's "
            f"HOST:6379)"
        )
    if ray.is_initialized():
        return False
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    logger.info("starting a local Ray runtime (dashboard off)")
    ray.init(include_dashboard=False, log_to_driver=True)
    return True


def current_ray_context() -> tuple[str, str] | None:
    """(cluster address, placement group id) of this process when it runs inside a Ray
    placement group (a Ray Serve replica, say), for an engine process started from it, which
    is a new Ray driver and would not see the group otherwise."""
    if not ray.is_initialized():
        return None
    group = ray.util.get_current_placement_group()
    if group is None:
        return None
    return ray.get_runtime_context().gcs_address, group.id.hex()


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k in FORWARDED_ENV or k.startswith(FORWARDED_ENV_PREFIX)}


def _wants_gpu(device: str) -> bool:
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) >= 1
    return device.startswith("cuda")


def _existing_placement_group(group_id: str | None) -> PlacementGroup | None:
    if group_id is not None:
        from ray._raylet import PlacementGroupID

        return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))
    return ray.util.get_current_placement_group()


def _bundles_for(group: PlacementGroup, resource: str, world_size: int) -> list[int]:
    """The last ``world_size`` bundles of ``group`` holding a ``resource`` (a Serve replica
    sits in the first bundle): a whole GPU each, or any share of a CPU."""
    least = 1 if resource == "GPU" else 1e-9
    usable = [i for i, bundle in enumerate(group.bundle_specs) if bundle.get(resource, 0) >= least]
    if len(usable) < world_size:
        raise PlacementError(
            f"the placement group this engine runs in has {len(usable)} bundle(s) with a "
            f"{resource}; tensor_parallel_size={world_size} needs {world_size}: give the "
            f"deployment one {{'{resource}': 1}} bundle per rank after its own"
        )
    return usable[-world_size:]


def _missing_resources(resource: str, world_size: int, timeout: float) -> str:
    total = ray.cluster_resources().get(resource, 0)
    free = ray.available_resources().get(resource, 0)
    return (
        f"Ray could not place {world_size} workers with one {resource} each within "
        f"{timeout:.0f} s: the cluster has {total:g} {resource}(s), {free:g} free. Add "
        f"{resource}s or nodes (ray_address), lower tensor_parallel_size, or raise "
        f"ray_placement_timeout"
    )


def _cause(exc: BaseException) -> BaseException:
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
