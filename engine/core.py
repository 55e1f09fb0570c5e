"""EngineCore: schedule -> execute -> update, one step at a time. No transport in here: the
offline LLM drives it in-process, the multiprocess client runs it inside ``run_engine_core``."""

from __future__ import annotations

import logging
import time

from caldera.engine.config import EngineConfig
from caldera.engine.image_processing import ProcessedImage
from caldera.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStatsMessage,
)
from caldera.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig
from caldera.scheduler.output import ImageFeature, SchedulerOutput
from caldera.worker.config import ModelConfig
from caldera.worker.executor import Executor, ParallelConfig, create_executor
from caldera.worker.isq import parse_isq
from caldera.worker.loader import resolve_model_path
from caldera.worker.tensor_parallel import check_tensor_parallel
from caldera.worker.worker import WorkerConfig

logger = logging.getLogger(__name__)


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.text.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(
            f"max_model_len={config.max_model_len} exceeds the model's "
            f"max_position_embeddings={limit}"
        )
    return config.max_model_len


def max_image_tokens(model_config: ModelConfig) -> int:
    """The most placeholder tokens one image can take (an image the size of a pinpoint)."""
    sizes = model_config.image_grid_pinpoints or [(model_config.vision.image_size,) * 2]
    return max(model_config.num_image_tokens(tuple(size)) for size in sizes)


def parallel_config(config: EngineConfig) -> ParallelConfig:
    return ParallelConfig.resolve(
        config.tensor_parallel_size, config.distributed_executor_backend,
        ray_address=config.ray_address, placement_group=config.ray_placement_group,
        placement_timeout=config.ray_placement_timeout,
    )


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_id: int | None = None) -> None:
        self.config = config
        model_dir = resolve_model_path(config.model, config.revision)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        parallel = parallel_config(config)
        isq = parse_isq(config.isq, config.isq_group_size)
        # Checked here, before any worker starts, so a split that cannot work fails at once.
        check_tensor_parallel(self.model_config, parallel.tensor_parallel_size,
                              isq.group_size if isq is not None else None)
        self.executor: Executor = create_executor(WorkerConfig(
            model_dir=str(model_dir), dtype=config.dtype, device=config.device,
            block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, kv_cache_bytes=config.kv_cache_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization, isq=config.isq,
            isq_group_size=config.isq_group_size, seed=config.seed,
            eos_token_ids=(eos_token_id,) if eos_token_id is not None else (),
        ), parallel)
        encoder_budget = max(config.max_num_batched_tokens, max_image_tokens(self.model_config))
        self.scheduler = Scheduler(SchedulerConfig(
            num_gpu_blocks=self.executor.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            encoder_budget=encoder_budget,
            encoder_cache_size=4 * encoder_budget,
            policy=config.scheduling_policy,
        ))

        # Per request until it ends: when it arrived (to report its first scheduling), its
        # image count and images encoded for it (the rest came from a cache).
        self._unscheduled: set[str] = set()
        self._images: dict[str, list[int]] = {}
        self._encoder = [0.0, 0, 0]  # seconds, images encoded, images served from a cache

    @property
    def num_blocks(self) -> int:
        return self.executor.num_blocks

    def check_health(self) -> None:
        """Raises WorkerError if a worker died, even while no step runs."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def add_request(self, request: EngineCoreRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; max_model_len is "
                f"{self.max_model_len}: shorten the prompt or use fewer/smaller images"
            )
        images = [
            ImageFeature(image.identifier, image.offset, image.length,
                         ProcessedImage(image.pixel_values.to_tensor(), tuple(image.image_size),
                                        image.base_only))
            for image in request.images
        ]
        self.scheduler.add_request(Request(
            request.request_id, request.prompt_token_ids,
            sampling_params=request.sampling_params, images=images,
            eos_token_id=request.eos_token_id, arrival_time=request.arrival_time or None,
            priority=request.priority,
        ))
        self._unscheduled.add(request.request_id)
        if images:
            self._images[request.request_id] = [len(images), 0]

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        for request_id in request_ids:
            self._forget(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def has_finished_requests(self) -> bool:
        """Finished or aborted ids the next step still has to hand to the workers."""
        return self.scheduler.has_finished_requests()

    def step(self) -> EngineCoreOutputs:
        """One engine step; returns what every request produced in it."""
        if not (self.scheduler.has_unfinished_requests()
                or self.scheduler.has_finished_requests()):
            return EngineCoreOutputs(stats=self.stats())
        scheduler_output = self.scheduler.schedule()
        scheduled_at = time.monotonic()
        first_scheduled = self._record_scheduled(scheduler_output)
        runner_output = self.executor.execute_model(scheduler_output)
        self._encoder[0] += runner_output.encoder_seconds
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs = []
        for u in updates:
            outputs.append(EngineCoreOutput(
                request_id=u.req_id,
                new_token_ids=u.new_token_ids,
                finish_reason=str(u.finish_reason) if u.finish_reason is not None else None,
                stop_reason=u.stop_reason,
                new_logprobs=u.new_logprobs,
                prompt_logprobs=u.prompt_logprobs,
                num_cached_tokens=u.num_cached_tokens,
                first_scheduled_time=scheduled_at if u.req_id in first_scheduled else None,
            ))
            if u.finish_reason is not None:
                self._forget(u.req_id)
        return EngineCoreOutputs(outputs=outputs, stats=self.stats())

    def _record_scheduled(self, out: SchedulerOutput) -> set[str]:
        """Ids scheduled for the first time this step; counts the images sent to encode."""
        first = {r.req_id for r in out.scheduled_new_reqs if r.req_id in self._unscheduled}
        self._unscheduled -= first
        for req_id, indices in out.scheduled_encoder_inputs.items():
            self._encoder[1] += len(indices)
            if req_id in self._images:
                self._images[req_id][1] += len(indices)
        return first

    def _forget(self, request_id: str) -> None:
        self._unscheduled.discard(request_id)
        counts = self._images.pop(request_id, None)
        if counts is not None:
            self._encoder[2] += max(counts[0] - counts[1], 0)

    def stats(self) -> SchedulerStatsMessage:
        s = self.scheduler.get_stats()
        return SchedulerStatsMessage(
            num_running=s.num_running_reqs, num_waiting=s.num_waiting_reqs,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
            encoder_seconds=self._encoder[0], encoder_runs=self._encoder[1],
            encoder_cache_hits=self._encoder[2],
        )
