"""The scheduler: pure Python over plain data (no torch), built from plain numbers.

The engine drives it with ``add_request``, ``schedule``, ``update_from_output`` and
``finish_requests``; see ``caldera.scheduler.scheduler`` for the step and
``caldera.scheduler.output`` for what crosses to the model runner.
"""

from caldera.scheduler.block_pool import BlockPool, KVCacheBlock, hash_block_tokens
from caldera.scheduler.config import SchedulerConfig
from caldera.scheduler.encoder_cache_manager import EncoderCacheManager
from caldera.scheduler.kv_cache_manager import KVCacheManager, PrefixCacheStats
from caldera.scheduler.output import (
    CachedRequestData,
    ImageFeature,
    Logprobs,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from caldera.scheduler.request import (
    FinishReason,
    Request,
    RequestQueue,
    RequestStatus,
    RequestUpdate,
)
from caldera.scheduler.scheduler import Scheduler, SchedulerStats

__all__ = [
    "BlockPool",
    "CachedRequestData",
    "EncoderCacheManager",
    "FinishReason",
    "ImageFeature",
    "KVCacheBlock",
    "KVCacheManager",
    "Logprobs",
    "ModelRunnerOutput",
    "NewRequestData",
    "PrefixCacheStats",
    "Request",
    "RequestQueue",
    "RequestStatus",
    "RequestUpdate",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "hash_block_tokens",
]
