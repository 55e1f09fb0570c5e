"""What the scheduler hands the model runner each step, and what comes back.

Plain data, no torch (workers read it; the engine re-exports ``SamplingParams`` to users).
New requests are sent whole the first step they are scheduled; requests
already known to the runner are sent as diffs (new blocks, how far they have been computed).
The runner keeps its own copy of each request's tokens between steps, so a request's token
list crosses once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # OpenAI's logit_bias: token id -> value added to its logit (-100 bans, 100 forces).
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a message naming the field and the accepted range."""
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1,
             f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class ImageFeature:
    """One image of a request: where its placeholder tokens sit and what fills them.

    ``offset`` is the index in the prompt of the first placeholder token, ``length`` the number
    of placeholder tokens (the encoder's output length for this image). ``identifier`` is the
    content hash: requests with the same image share its encoder output and prefix-cache blocks.
    ``data`` is opaque to the scheduler (pixel tensors and the original size, for the runner).
    """

    identifier: str
    offset: int
    length: int
    data: Any = None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class NewRequestData:
    req_id: str
    prompt_token_ids: list[int]
    images: list[ImageFeature]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass
class CachedRequestData:
    """Diffs for requests the runner has seen before, index-aligned lists."""

    req_ids: list[str] = field(default_factory=list)
    # True when the request was preempted and is scheduled again: its block list is replaced.
    resumed_from_preemption: list[bool] = field(default_factory=list)
    # Blocks appended since the last step (the whole list when resumed).
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)


@dataclass
class SchedulerOutput:
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    # req_id -> number of tokens to compute this step.
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    # req_id -> indices (into the request's images) of the images to encode this step.
    scheduled_encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    # Requests finished or aborted since the last step: the runner drops their state.
    finished_req_ids: set[str] = field(default_factory=set)
    # Image identifiers whose encoder output the runner may drop.
    free_encoder_identifiers: list[str] = field(default_factory=list)


@dataclass
class Logprobs:
    """Log-probabilities of one sampled position: the sampled token's and the top N."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    req_ids: list[str]
    # One list per request: empty while a prefill is still partial, else one sampled token.
    sampled_token_ids: list[list[int]]
    # Per request, per sampled token (None when the request asked for no logprobs).
    logprobs: list[list[Logprobs] | None]
    # Per request, for the prompt positions computed this step (None unless asked for).
    prompt_logprobs: list[list[Logprobs] | None]
    # Wall time of this step's vision encoder runs (0 when none ran).
    encoder_seconds: float = 0.0
