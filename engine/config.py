"""EngineConfig: every engine option, frozen, parsed in one place (the CLI or LLM(...)).

Derived values (the model folder, dtype, number of KV blocks) are computed by the code that
needs them and passed on, never written back here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

import msgspec

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_bytes(value: int | float | str) -> int:
    """``2GiB``, ``512MiB``, ``1.5GB``, ``4096`` -> bytes."""
    if isinstance(value, (int, float)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {value!r} as a size; write e.g. 2GiB, 512MiB or 1000000")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    model: str
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    kv_cache_memory: int | str | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    seed: int | None = 0
    isq: str | None = None
    isq_group_size: int | None = None
    chat_template: str | None = None
    allowed_local_media_paths: tuple[str, ...] = field(default_factory=tuple)
    # Tensor parallelism over Ray workers; "uni" runs the model in this process, "ray" in Ray
    # actors (the default when tensor_parallel_size > 1).
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    # Ray cluster to join (default: RAY_ADDRESS, else a local one is started).
    ray_address: str | None = None
    # Seconds to wait for Ray to place the workers before failing with what is missing.
    ray_placement_timeout: float = 60.0
    # Hex id of an existing placement group for the workers (default: the one this process
    # runs in, as a Ray Serve replica does, else a new one).
    ray_placement_group: str | None = None

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64):
            raise ValueError(f"block_size must be 8, 16, 32 or 64, got {self.block_size}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be at least 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError("scheduling_policy must be 'fcfs' or 'priority'")
        if self.kv_cache_memory is not None:
            parse_bytes(self.kv_cache_memory)
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be at least 1, got "
                             f"{self.tensor_parallel_size}")
        if self.distributed_executor_backend not in (None, "uni", "ray"):
            raise ValueError("distributed_executor_backend must be 'uni' or 'ray', got "
                             f"{self.distributed_executor_backend!r}")
        if self.tensor_parallel_size > 1 and self.distributed_executor_backend == "uni":
            raise ValueError("tensor_parallel_size > 1 runs its ranks as Ray workers: use "
                             "distributed_executor_backend='ray' (or leave it unset)")
        if self.ray_placement_timeout <= 0:
            raise ValueError("ray_placement_timeout must be positive")

    @property
    def kv_cache_bytes(self) -> int | None:
        return None if self.kv_cache_memory is None else parse_bytes(self.kv_cache_memory)

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_bytes(self) -> bytes:
        """Wire form for the engine process (JSON, never pickle)."""
        return msgspec.json.encode(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> EngineConfig:
        return msgspec.json.decode(data, type=cls)
