"""What the scheduler hands the model runner each step, and what comes back.

Plain data, no torch. New requests are sent whole the first step they are scheduled; requests
already known to the runner are sent as diffs (new blocks, how far they have been computed).
The runner keeps its own copy of each request's tokens between steps, so a request's token
list crosses once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
    sampling_params: Any
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
