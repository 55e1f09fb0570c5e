"""Worker: one device's share of the model. Loads the weights (its tensor-parallel shard when
given a group, applying ISQ as they arrive), sizes the paged KV cache from the memory budget,
and runs steps through its ModelRunner.

Start-up is three calls, so an executor can agree on one block count for all ranks::

    worker = Worker(config, group)              # load the model
    blocks = worker.available_blocks()          # what this rank's memory holds
    worker.initialize_cache(min(all ranks))     # allocate the KV cache, build the runner
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from caldera.kernels import cpu_attention
from caldera.scheduler.output import ModelRunnerOutput, SchedulerOutput
from caldera.worker.config import ModelConfig
from caldera.worker.cpu_linear import pack_linears
from caldera.worker.distributed import TensorParallelGroup
from caldera.worker.host_memory import keep_freed_memory
from caldera.worker.isq import make_linear_transform, model_bytes, parse_isq
from caldera.worker.loader import load_model, resolve_dtype
from caldera.worker.model_runner import ModelRunner, kv_cache_bytes_per_block
from caldera.worker.models.clip import select_vision_attention
from caldera.worker.tensor_parallel import local_num_kv_heads, parallelize_model

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_BYTES = 4 * 1024**3


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    model_dir: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    max_model_len: int = 4096
    max_num_seqs: int = 128
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    isq: str | None = None
    isq_group_size: int | None = None
    seed: int | None = 0
    eos_token_ids: tuple[int, ...] = ()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available")
    return resolved


class Worker:
    """``group``: this rank's tensor-parallel group (None: the whole model, one rank)."""

    def __init__(self, config: WorkerConfig, group: TensorParallelGroup | None = None) -> None:
        self.config = config
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world_size = group.world_size if group is not None else 1
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_model_dir(config.model_dir)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.num_kv_heads = local_num_kv_heads(self.model_config.text, self.world_size)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.model = self._load()
        if self.device.type == "cpu":
            keep_freed_memory()
            if cpu_attention.enabled():
                # Built (or loaded from its cache) now rather than inside the first request.
                logger.info("CPU attention: %s", "C++ op" if cpu_attention.load() else "torch")
        self.num_blocks = 0
        self.runner: ModelRunner | None = None

    @classmethod
    def create(cls, config: WorkerConfig) -> Worker:
        """A single-rank worker, loaded and with its KV cache allocated."""
        worker = cls(config)
        worker.initialize_cache(worker.available_blocks())
        return worker

    def initialize_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.runner = ModelRunner(
            self.model, self.model_config, num_blocks=num_blocks,
            block_size=self.config.block_size, device=self.device, dtype=self.dtype,
            eos_token_ids=self.config.eos_token_ids, seed=self.config.seed,
            num_kv_heads=self.num_kv_heads, samples=self.rank == 0,
        )
        per_block = kv_cache_bytes_per_block(self.model_config, self.config.block_size,
                                             self.dtype, self.num_kv_heads)
        logger.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks,
                    self.config.block_size, num_blocks * per_block / 2**20)

    def _load(self) -> torch.nn.Module:
        transform = None
        if self.config.isq is not None:
            spec = parse_isq(self.config.isq, self.config.isq_group_size)
            transform = make_linear_transform(spec) if spec is not None else None
        parallelize = None
        if self.group is not None and self.world_size > 1:
            parallelize = partial(parallelize_model, config=self.model_config, group=self.group)
        model = load_model(Path(self.config.model_dir), self.model_config, dtype=self.dtype,
                           device=self.device, linear_transform=transform,
                           model_transform=parallelize, progress=self.rank == 0)
        if self.device.type == "cpu":
            packed = pack_linears(model, self.dtype)
            if packed:
                logger.info("%d linears packed for oneDNN", packed)
        attention, name = select_vision_attention(self.device, self.dtype)
        model.vision_tower.set_attention(attention)
        logger.info("vision tower attention: %s", name)
        size = model_bytes(model)
        if transform is not None:
            unquantized = _checkpoint_bytes(Path(self.config.model_dir), self.dtype)
            logger.info("ISQ %s: weights %.1f MiB -> %.1f MiB", self.config.isq,
                        unquantized / 2**20, size / 2**20)
        logger.info("model loaded: %s, %s on %s, %.1f MiB of weights",
                    self.model_config.architecture, self.dtype, self.device, size / 2**20)
        return model

    def available_blocks(self) -> int:
        """KV cache blocks this rank's memory budget holds (each holds its own KV heads)."""
        per_block = kv_cache_bytes_per_block(self.model_config, self.config.block_size,
                                             self.dtype, self.num_kv_heads)
        if self.config.kv_cache_bytes is not None:
            budget = self.config.kv_cache_bytes
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.gpu_memory_utilization) - 512 * 2**20
        else:
            budget = DEFAULT_CPU_KV_CACHE_BYTES
        # Never more than max_num_seqs full-length sequences can use.
        per_seq = -(-self.config.max_model_len // self.config.block_size)
        ceiling = self.config.max_num_seqs * per_seq + 1
        num_blocks = min(budget // per_block, ceiling)
        if num_blocks < per_seq:
            raise ValueError(
                f"the KV cache budget ({budget / 2**20:.0f} MiB) holds {num_blocks} blocks, "
                f"fewer than one sequence of max_model_len={self.config.max_model_len} needs "
                f"({per_seq}); raise kv_cache_memory or lower max_model_len"
            )
        return int(num_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        """One step; the sampled tokens on rank 0, None on the other ranks."""
        assert self.runner is not None, "initialize_cache() first"
        return self.runner.execute_model(scheduler_output)

    def append_sampled(self, req_ids: list[str], sampled_token_ids: list[list[int]]) -> None:
        """Ranks other than 0: the tokens rank 0 sampled in the previous step."""
        assert self.runner is not None, "initialize_cache() first"
        self.runner.append_sampled(req_ids, sampled_token_ids)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()


def _checkpoint_bytes(model_dir: Path, dtype: torch.dtype) -> int:
    """Size the checkpoint's weights would take unquantized in ``dtype``."""
    from safetensors import safe_open

    from caldera.worker.loader import checkpoint_files

    per_element = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                total += _numel(f, key)
    return total * per_element


def _numel(f, key: str) -> int:
    count = 1
    for dim in f.get_slice(key).get_shape():
        count *= dim
    return count
