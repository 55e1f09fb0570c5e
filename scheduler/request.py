"""A request as the scheduler sees it, the waiting queue, and the per-step result it reports.

A request is a token list (prompt, then output) and a count of how many of those tokens have
their KV computed::

    all_token_ids   [ p0 p1 ... p{P-1} | o0 o1 ... o{k-1} ]
                      <----- prompt ----><---- output ---->
    num_computed_tokens ----------^        (a chunked prefill stops inside the prompt;
                                            a decoding request has computed all but the last)

Prefix-cache hits, chunked prefill and preemption (recompute) only move
``num_computed_tokens``; nothing else distinguishes "prefill" from "decode".
"""

from __future__ import annotations

import enum
import heapq
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caldera.scheduler.output import ImageFeature, Logprobs

if TYPE_CHECKING:
    from caldera.scheduler.block_pool import BlockHash, KVCacheBlock


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


class FinishReason(enum.IntEnum):
    """Why a request finished; ``str()`` gives the OpenAI ``finish_reason`` value."""

    STOP = 0
    LENGTH = 1
    ABORT = 2

    def __str__(self) -> str:
        return self.name.lower()


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Request:
    """One sequence: its tokens, progress, images, stop conditions and KV blocks.

    ``max_tokens``, ``min_tokens``, ``ignore_eos`` and ``stop_token_ids`` are read from
    ``sampling_params`` when it has them (an explicit ``max_tokens`` argument wins); a missing
    ``max_tokens`` means "until max_model_len". ``images`` must be sorted by offset, must not
    overlap and must lie inside the prompt. ``arrival_time`` (seconds since the epoch, now by
    default) and ``priority`` order the queues.

    ``max_num_tokens`` is the token count at which the request stops with ``length``
    (``add_request`` caps it at ``max_model_len``); ``stop_token_set`` holds the tokens that
    may stop it (EOS unless ``ignore_eos``, and ``stop_token_ids``).

    ``blocks``, ``block_hashes`` and ``num_cached_blocks`` belong to the KV cache manager:
    ``block_hashes[i]`` is the hash of full block ``i`` of the token list (computed as blocks
    fill), ``num_cached_blocks`` how many of ``blocks`` are registered in the prefix cache.
    """

    __slots__ = (
        "request_id",
        "prompt_token_ids",
        "all_token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "status",
        "images",
        "sampling_params",
        "eos_token_id",
        "arrival_time",
        "priority",
        "max_tokens",
        "min_tokens",
        "ignore_eos",
        "stop_token_ids",
        "stop_token_set",
        "max_num_tokens",
        "stop_reason",
        "sort_key",
        "blocks",
        "block_hashes",
        "num_cached_blocks",
        "num_cached_tokens",
        "num_preemptions",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        *,
        sampling_params: Any = None,
        images: Sequence[ImageFeature] = (),
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        max_tokens: int | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt has no tokens")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.all_token_ids = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.images = list(images)
        _check_images(request_id, self.images, self.num_prompt_tokens)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.priority = priority
        if max_tokens is None:
            max_tokens = getattr(sampling_params, "max_tokens", None)
        self.max_tokens: int | None = max_tokens
        self.min_tokens: int = getattr(sampling_params, "min_tokens", 0) or 0
        self.ignore_eos: bool = bool(getattr(sampling_params, "ignore_eos", False))
        self.stop_token_ids = frozenset(getattr(sampling_params, "stop_token_ids", None) or ())
        # Tokens that may stop the request (subject to min_tokens): stop ids, and EOS.
        self.stop_token_set = self.stop_token_ids
        if eos_token_id is not None and not self.ignore_eos:
            self.stop_token_set = self.stop_token_ids | {eos_token_id}
        # Token count at which the request stops with "length" (set by the scheduler from
        # max_tokens and max_model_len).
        self.max_num_tokens = self.num_prompt_tokens + max_tokens if max_tokens else 1 << 62
        # The stop token that finished the request, if one did.
        self.stop_reason: int | None = None
        # Set by the scheduler when the request is added: its place in the queues.
        self.sort_key: tuple = ()
        self.blocks: list[KVCacheBlock] = []
        self.block_hashes: list[BlockHash] = []
        self.num_cached_blocks = 0
        # Prompt tokens found in the prefix cache the first time the request was scheduled.
        self.num_cached_tokens = -1
        self.num_preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )


def _check_images(request_id: str, images: list[ImageFeature], num_prompt_tokens: int) -> None:
    end = 0
    for index, image in enumerate(images):
        if image.length < 1 or image.offset < end or image.end > num_prompt_tokens:
            raise ValueError(
                f"request {request_id!r}: image {index} (offset {image.offset}, length "
                f"{image.length}) must have a positive length, follow the previous image "
                f"without overlap and lie inside the {num_prompt_tokens}-token prompt"
            )
        end = image.end


class RequestQueue:
    """Waiting requests, popped in ``sort_key`` order.

    The key is (arrival, seq) under FCFS and (priority, arrival, seq) under the priority
    policy, so a preempted request, which arrived before every request still waiting behind
    it, goes back to the front under FCFS.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, Request]] = []

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (request.sort_key, request))

    def peek(self) -> Request:
        return self._heap[0][1]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1]

    def remove_all(self, requests: Iterable[Request]) -> None:
        """O(n); only aborts of waiting requests use it."""
        gone = {id(request) for request in requests}
        self._heap = [entry for entry in self._heap if id(entry[1]) not in gone]
        heapq.heapify(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[1] for entry in sorted(self._heap, key=lambda entry: entry[0]))


@dataclass(slots=True)
class RequestUpdate:
    """What one step changed for one request: new tokens and, once done, why it finished.

    ``new_logprobs`` / ``prompt_logprobs`` are passed through from the model runner.
    ``stop_reason`` is the stop token id that finished the request, if one did.
    """

    req_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_reason: int | None = None
    new_logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs] | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
