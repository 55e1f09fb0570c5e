"""Executors: what EngineCore drives each step, whatever runs the model behind it.

    EngineCore --SchedulerOutput--> Executor --> one Worker per rank --> ModelRunnerOutput

``UniProcExecutor`` (the default) holds one Worker in this process. ``RayExecutor``
(``caldera.worker.ray_executor``) runs one Worker per tensor-parallel rank, each in its own Ray
actor. Both return rank 0's output: the sampled tokens of every request in the step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from caldera.scheduler.output import ModelRunnerOutput, SchedulerOutput
from caldera.worker.worker import Worker, WorkerConfig

EXECUTOR_BACKENDS = ("uni", "ray")
DEFAULT_PLACEMENT_TIMEOUT = 60.0


class WorkerError(RuntimeError):
    """A worker died or failed a step; the engine cannot go on. The message names the rank
    and its node."""


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the model is spread: ``tensor_parallel_size`` ranks, run by ``backend``.

    ``ray_address``: the Ray cluster to join (None: ``RAY_ADDRESS``, else a local one is
    started). ``placement_group``: hex id of an existing placement group to run the workers in
    (None: the one this process runs in, if any, else a new one). ``placement_timeout``:
    seconds to wait for the cluster to place the workers before failing.
    """

    tensor_parallel_size: int = 1
    backend: str = "uni"
    ray_address: str | None = None
    placement_group: str | None = None
    placement_timeout: float = DEFAULT_PLACEMENT_TIMEOUT

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}")
        if self.backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of "
                             f"{', '.join(EXECUTOR_BACKENDS)}, got {self.backend!r}")
        if self.tensor_parallel_size > 1 and self.backend != "ray":
            raise ValueError("tensor_parallel_size > 1 runs on Ray: use "
                             "distributed_executor_backend='ray' (or leave it unset)")
        if self.placement_timeout <= 0:
            raise ValueError(f"ray_placement_timeout must be positive, got "
                             f"{self.placement_timeout}")

    @classmethod
    def resolve(cls, tensor_parallel_size: int, backend: str | None,
                **options: object) -> ParallelConfig:
        """``backend`` None: Ray when there is more than one rank, else in-process."""
        if backend is None:
            backend = "ray" if tensor_parallel_size > 1 else "uni"
        return cls(tensor_parallel_size=tensor_parallel_size, backend=backend, **options)


class Executor(ABC):
    """Runs steps on the workers. ``num_blocks``: the KV cache blocks every rank holds."""

    num_blocks: int

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """One step on every rank; rank 0's output. Raises WorkerError if a worker failed."""

    @abstractmethod
    def check_health(self) -> None:
        """Raises WorkerError if a worker has died (checked without waiting on a step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stops the workers; idempotent."""


class UniProcExecutor(Executor):
    """The whole model in this process, one Worker."""

    def __init__(self, worker_config: WorkerConfig) -> None:
        self.worker = Worker.create(worker_config)
        self.num_blocks = self.worker.num_blocks

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        output = self.worker.execute_model(scheduler_output)
        assert output is not None  # a single rank samples
        return output

    def check_health(self) -> None:
        pass  # the worker is this process

    def shutdown(self) -> None:
        pass


def create_executor(worker_config: WorkerConfig, parallel: ParallelConfig) -> Executor:
    if parallel.backend == "ray":
        try:
            from caldera.worker.ray_executor import RayExecutor
        except ImportError as exc:  # Ray is an optional dependency
            raise ValueError("the ray executor (tensor_parallel_size > 1) needs Ray: "
                             "pip install 'caldera[ray]'") from exc
        return RayExecutor(worker_config, parallel)
    return UniProcExecutor(worker_config)
