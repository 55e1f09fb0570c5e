"""EngineCore: schedule -> execute -> update, one step at a time. No transport in here: the
offline LLM drives it in-process, the multiprocess client runs it inside ``run_engine_core``."""

from __future__ import annotations

import logging

from caldera.engine.config import EngineConfig
from caldera.engine.image_processing import ProcessedImage
from caldera.engine.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStatsMessage,
)
from caldera.scheduler import Request, RequestStatus, Scheduler, SchedulerConfig
from caldera.scheduler.output import ImageFeature
from caldera.worker.config import ModelConfig
from caldera.worker.loader import resolve_model_path
from caldera.worker.worker import Worker, WorkerConfig

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


class EngineCore:
    def __init__(self, config: EngineConfig, eos_token_id: int | None = None) -> None:
        self.config = config
        model_dir = resolve_model_path(config.model, config.revision)
        self.model_config = ModelConfig.from_model_dir(model_dir)
        self.max_model_len = resolve_max_model_len(config, self.model_config)
        self.worker = Worker(WorkerConfig(
            model_dir=str(model_dir), dtype=config.dtype, device=config.device,
            block_size=config.block_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, kv_cache_bytes=config.kv_cache_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization, isq=config.isq,
            isq_group_size=config.isq_group_size, seed=config.seed,
            eos_token_ids=(eos_token_id,) if eos_token_id is not None else (),
        ))
        encoder_budget = max(config.max_num_batched_tokens, max_image_tokens(self.model_config))
        self.scheduler = Scheduler(SchedulerConfig(
            num_gpu_blocks=self.worker.num_blocks,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            block_size=config.block_size,
            enable_prefix_caching=config.enable_prefix_caching,
            encoder_budget=encoder_budget,
            encoder_cache_size=4 * encoder_budget,
            policy=config.scheduling_policy,
        ))

    @property
    def num_blocks(self) -> int:
        return self.worker.num_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        if len(request.prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; max_model_len is "
                f"{self.max_model_len}: shorten the prompt or use fewer/smaller images"
            )
        images = [
            ImageFeature(image.identifier, image.offset, image.length,
                         ProcessedImage(image.pixel_values.to_tensor(), tuple(image.image_size)))
            for image in request.images
        ]
        self.scheduler.add_request(Request(
            request.request_id, request.prompt_token_ids,
            sampling_params=request.sampling_params, images=images,
            eos_token_id=request.eos_token_id, arrival_time=request.arrival_time or None,
            priority=request.priority,
        ))

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> EngineCoreOutputs:
        """One engine step; returns what every request produced in it."""
        if not (self.scheduler.has_unfinished_requests()
                or self.scheduler.has_finished_requests()):
            return EngineCoreOutputs(stats=self.stats())
        scheduler_output = self.scheduler.schedule()
        runner_output = self.worker.execute_model(scheduler_output)
        updates = self.scheduler.update_from_output(scheduler_output, runner_output)
        outputs = [
            EngineCoreOutput(
                request_id=u.req_id,
                new_token_ids=u.new_token_ids,
                finish_reason=str(u.finish_reason) if u.finish_reason is not None else None,
                stop_reason=u.stop_reason,
                new_logprobs=u.new_logprobs,
                prompt_logprobs=u.prompt_logprobs,
                num_cached_tokens=u.num_cached_tokens,
            )
            for u in updates
        ]
        return EngineCoreOutputs(outputs=outputs, stats=self.stats())

    def stats(self) -> SchedulerStatsMessage:
        s = self.scheduler.get_stats()
        return SchedulerStatsMessage(
            num_running=s.num_running_reqs, num_waiting=s.num_waiting_reqs,
            kv_cache_usage=s.kv_cache_usage,
            prefix_cache_queries=s.prefix_cache_queries, prefix_cache_hits=s.prefix_cache_hits,
            num_preemptions=s.num_preemptions,
        )
