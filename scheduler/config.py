"""SchedulerConfig: the plain numbers a Scheduler is built from.

Frozen and built by the caller (the CLI or a test); nothing here reads files. Derived values
(for instance the number of KV blocks the GPU can hold) are computed elsewhere and passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SchedulingPolicy = Literal["fcfs", "priority"]


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Budgets and sizes of the scheduler.

    ``max_num_batched_tokens``: token budget of one step, shared by prefill chunks and decodes.
    ``max_num_seqs``: most requests running at once (each running request holds KV blocks).
    ``max_model_len``: longest sequence (prompt + output); a request stops with ``length``
    when it reaches it.
    ``num_gpu_blocks`` blocks of ``block_size`` tokens each make up the KV cache.
    ``encoder_budget``: image tokens the vision encoder may produce in one step.
    ``encoder_cache_size``: image tokens the runner's encoder cache holds.
    ``policy``: ``"fcfs"`` (arrival order) or ``"priority"`` (lower value first, then arrival).
    ``long_prefill_token_threshold``: when > 0, at most this many tokens of one request per
    step, so one long prompt cannot take the whole budget.
    """

    num_gpu_blocks: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    encoder_budget: int = 8192
    encoder_cache_size: int = 8192
    policy: SchedulingPolicy = "fcfs"
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        positive = {
            "num_gpu_blocks": self.num_gpu_blocks,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_model_len": self.max_model_len,
            "block_size": self.block_size,
            "encoder_budget": self.encoder_budget,
            "encoder_cache_size": self.encoder_cache_size,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(
                "long_prefill_token_threshold must be >= 0 (0 disables it), "
                f"got {self.long_prefill_token_threshold}"
            )
        if self.num_gpu_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"the KV cache ({self.num_gpu_blocks} blocks of {self.block_size} tokens) cannot "
                f"hold one sequence of max_model_len={self.max_model_len} tokens: lower "
                f"max_model_len or give the cache at least {self.max_blocks_per_seq} blocks"
            )

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)
