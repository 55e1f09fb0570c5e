"""Scheduler: one token budget per step, shared by every running and waiting request.

Each step (``schedule``):

1. running requests, in policy order, get their next tokens: 1 for a decode, a chunk for an
   unfinished prefill; when the KV cache is out of blocks, the last running request (latest
   arrival, or lowest priority) is preempted: its blocks are freed and it waits again with
   nothing computed (recompute, cheap when its blocks are still in the prefix cache);
2. if nothing was preempted, waiting requests start in policy order, skipping prefix-cache
   hits, while budget, ``max_num_seqs`` and blocks allow; the first that does not fit stops
   the phase;
3. the result goes out as a ``SchedulerOutput``: new requests whole, known ones as diffs.

``num_computed_tokens`` advances when a request is scheduled, so ``update_from_output``
(which appends the sampled tokens and applies stop rules) must follow each ``schedule``
before the next one.

A chunk may reach an image's placeholder only if the image is cached or encoded in this step
(under ``encoder_budget``); otherwise the chunk stops at the placeholder.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import attrgetter

from caldera.scheduler.block_pool import KVCacheBlock
from caldera.scheduler.config import SchedulerConfig
from caldera.scheduler.encoder_cache_manager import EncoderCacheManager, EncoderPlan
from caldera.scheduler.kv_cache_manager import KVCacheManager
from caldera.scheduler.output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from caldera.scheduler.request import (
    Request,
    RequestQueue,
    RequestStatus,
    RequestUpdate,
)

_sort_key = attrgetter("sort_key")
_RUNNING = RequestStatus.RUNNING


@dataclass
class SchedulerStats:
    """A snapshot for metrics; the prefix-cache and preemption counts are cumulative."""

    num_running_reqs: int
    num_waiting_reqs: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    encoder_cache_usage: float


@dataclass(slots=True)
class _Step:
    """What one ``schedule`` call has handed out so far."""

    token_budget: int
    encoder_budget: int
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: CachedRequestData = field(default_factory=CachedRequestData)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    encoder_inputs: dict[str, list[int]] = field(default_factory=dict)
    num_preempted: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv_cache_manager = KVCacheManager(
            config.num_gpu_blocks, config.block_size, config.enable_prefix_caching
        )
        self.encoder_cache_manager = EncoderCacheManager(config.encoder_cache_size)
        self.requests: dict[str, Request] = {}
        self.waiting = RequestQueue()
        # Sorted by sort_key: the last one is the first to be preempted.
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_req_ids: set[str] = set()
        self._arrival_seq = itertools.count()

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request: Request) -> None:
        """Queues a new request. Raises ValueError (saying what to change) when it can
        never be scheduled: a duplicate id, a prompt over ``max_model_len``, or an image
        larger than the encoder budget or cache."""
        config = self.config
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.num_prompt_tokens > config.max_model_len:
            raise ValueError(
                f"request {request.request_id!r}: the prompt has {request.num_prompt_tokens} "
                f"tokens, more than max_model_len={config.max_model_len}; shorten it"
            )
        limit = min(config.encoder_budget, config.encoder_cache_size)
        for image in request.images:
            if image.length > limit:
                raise ValueError(
                    f"request {request.request_id!r}: an image of {image.length} tokens does "
                    f"not fit encoder_budget={config.encoder_budget} / encoder_cache_size="
                    f"{config.encoder_cache_size}; raise them to at least {image.length}"
                )
        max_tokens = request.max_tokens
        request.max_num_tokens = config.max_model_len
        if max_tokens is not None:
            request.max_num_tokens = min(
                config.max_model_len, request.num_prompt_tokens + max_tokens
            )
        seq = next(self._arrival_seq)
        if config.policy == "priority":
            request.sort_key = (request.priority, request.arrival_time, seq)
        else:
            request.sort_key = (request.arrival_time, seq)
        request.status = RequestStatus.WAITING
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(
        self,
        req_ids: str | Iterable[str],
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
    ) -> None:
        """Finishes requests in any state (an abort, or a stop string found upstream) and
        frees everything they hold. Unknown or already finished ids are ignored."""
        if not status.is_finished:
            raise ValueError(f"finish_requests needs a finished status, got {status.name}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        finished = [self.requests[i] for i in dict.fromkeys(req_ids) if i in self.requests]
        if not finished:
            return
        running_ids = {id(r) for r in finished if r.status == RequestStatus.RUNNING}
        if running_ids:
            self.running = [r for r in self.running if id(r) not in running_ids]
        waiting = [r for r in finished if r.status != RequestStatus.RUNNING]
        if waiting:
            self.waiting.remove_all(waiting)
        for request in finished:
            request.status = status
            self._free_request(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def has_finished_requests(self) -> bool:
        """True while finished ids wait to be sent to the runner by the next ``schedule``."""
        return bool(self._finished_req_ids)

    def get_stats(self) -> SchedulerStats:
        prefix = self.kv_cache_manager.prefix_cache_stats
        return SchedulerStats(
            num_running_reqs=len(self.running),
            num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv_cache_manager.usage,
            prefix_cache_queries=prefix.queries,
            prefix_cache_hits=prefix.hits,
            prefix_cache_hit_rate=prefix.hit_rate,
            num_preemptions=self.num_preemptions,
            encoder_cache_usage=self.encoder_cache_manager.usage,
        )

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached block; refused (False) while any request holds blocks."""
        return self.kv_cache_manager.reset_prefix_cache()

    # ---------------------------------------------------------------------------- schedule

    def schedule(self) -> SchedulerOutput:
        """Hands out this step's tokens; see the module docstring for the phases."""
        step = _Step(self.config.max_num_batched_tokens, self.config.encoder_budget)
        self._schedule_running(step)
        if not step.num_preempted:
            self._schedule_waiting(step)
        return self._make_output(step)

    def _schedule_running(self, step: _Step) -> None:
        """Running requests in order. The hot path of a decode-heavy step: a text-only decode
        that needs no new block costs one call (``allocate_slots``)."""
        running = self.running
        allocate_slots = self.kv_cache_manager.allocate_slots
        fit_tokens = self._fit_tokens
        num_scheduled_tokens = step.num_scheduled_tokens
        scheduled: list[tuple[Request, int, list[KVCacheBlock]]] = []
        budget = step.token_budget
        index = 0
        while index < len(running) and budget > 0:
            request = running[index]
            index += 1
            start = request.num_computed_tokens
            num_new = len(request.all_token_ids) - start
            plan = None
            if num_new != 1 or request.images:  # a text-only decode always fits: skip
                num_new, plan = fit_tokens(request, start, budget, step.encoder_budget)
                if num_new == 0:
                    continue
            new_blocks = allocate_slots(request, num_new)
            if new_blocks is None:
                new_blocks = self._preempt_until_allocated(request, num_new, step)
                if new_blocks is None:
                    break  # the request preempted itself: it was the last one
            scheduled.append((request, start, new_blocks))
            budget -= num_new
            num_scheduled_tokens[request.request_id] = num_new
            request.num_computed_tokens = start + num_new
            if plan is not None:
                self._commit_encoder(request, plan, step)
        step.token_budget = budget
        cached = step.cached_reqs
        cached.req_ids += [request.request_id for request, _, _ in scheduled]
        cached.resumed_from_preemption += [False] * len(scheduled)
        cached.new_block_ids += [
            [block.block_id for block in blocks] if blocks else [] for _, _, blocks in scheduled
        ]
        cached.num_computed_tokens += [start for _, start, _ in scheduled]

    def _schedule_waiting(self, step: _Step) -> None:
        max_num_seqs = self.config.max_num_seqs
        while self.waiting and step.token_budget > 0 and len(self.running) < max_num_seqs:
            request = self.waiting.peek()
            if not self._start(request, step):
                break
            self.waiting.pop()

    def _start(self, request: Request, step: _Step) -> bool:
        """Schedules a waiting request (new or preempted), after its prefix-cache hits."""
        kv = self.kv_cache_manager
        computed_blocks, num_hit = kv.get_computed_blocks(request)
        num_new, plan = self._fit_tokens(request, num_hit, step.token_budget, step.encoder_budget)
        if num_new == 0:
            return False
        if kv.allocate_slots(request, num_new, computed_blocks, num_hit) is None:
            return False
        resumed = request.status == RequestStatus.PREEMPTED
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_hit
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_hit
        bisect.insort(self.running, request, key=_sort_key)
        block_ids = kv.get_block_ids(request)
        if resumed:
            cached = step.cached_reqs
            cached.req_ids.append(request.request_id)
            cached.resumed_from_preemption.append(True)
            cached.new_block_ids.append(block_ids)
            cached.num_computed_tokens.append(num_hit)
        else:
            step.new_reqs.append(
                NewRequestData(
                    req_id=request.request_id,
                    prompt_token_ids=request.prompt_token_ids,
                    images=request.images,
                    sampling_params=request.sampling_params,
                    block_ids=block_ids,
                    num_computed_tokens=num_hit,
                )
            )
        step.token_budget -= num_new
        step.num_scheduled_tokens[request.request_id] = num_new
        request.num_computed_tokens = num_hit + num_new
        if plan is not None:
            self._commit_encoder(request, plan, step)
        return True

    def _fit_tokens(
        self, request: Request, start: int, token_budget: int, encoder_budget: int
    ) -> tuple[int, EncoderPlan | None]:
        """How many tokens from ``start`` the request may compute this step: what is left,
        capped by the token budget, the long-prefill threshold and the encoder (with the
        encoder plan when an image is in reach)."""
        num_new = len(request.all_token_ids) - start
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < num_new:
            num_new = threshold
        if num_new > token_budget:
            num_new = token_budget
        images = request.images
        if num_new <= 0 or not images or images[-1].end <= start:
            return max(num_new, 0), None
        plan = self.encoder_cache_manager.plan(request, start, num_new, encoder_budget)
        return plan.num_tokens, plan

    def _preempt_until_allocated(
        self, request: Request, num_new: int, step: _Step
    ) -> list[KVCacheBlock] | None:
        """Preempts from the back of ``running`` until blocks for ``num_new`` more tokens of
        the request fit. None when the request itself had to be preempted."""
        while True:
            victim = self.running.pop()
            self._preempt(victim)
            step.num_preempted += 1
            if victim is request:
                return None
            new_blocks = self.kv_cache_manager.allocate_slots(request, num_new)
            if new_blocks is not None:
                return new_blocks

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.encoder_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)

    def _commit_encoder(self, request: Request, plan: EncoderPlan, step: _Step) -> None:
        self.encoder_cache_manager.commit(request, plan)
        if plan.to_encode:
            step.encoder_inputs[request.request_id] = plan.to_encode
            step.encoder_budget -= plan.num_encoder_tokens

    def _make_output(self, step: _Step) -> SchedulerOutput:
        output = SchedulerOutput(
            scheduled_new_reqs=step.new_reqs,
            scheduled_cached_reqs=step.cached_reqs,
            num_scheduled_tokens=step.num_scheduled_tokens,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - step.token_budget,
            scheduled_encoder_inputs=step.encoder_inputs,
            finished_req_ids=self._finished_req_ids,
            free_encoder_identifiers=self.encoder_cache_manager.take_freed_identifiers(),
        )
        self._finished_req_ids = set()
        return output

    # -------------------------------------------------------------------- after the model

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> list[RequestUpdate]:
        """Appends the sampled tokens, applies the stop rules, frees finished requests.

        Returns one update per request that got tokens or logprobs or finished this step.
        Requests finished (aborted) between ``schedule`` and this call are skipped.
        """
        logprobs = model_runner_output.logprobs
        prompt_logprobs = model_runner_output.prompt_logprobs
        requests = self.requests
        release_computed = self.encoder_cache_manager.release_computed
        updates: list[RequestUpdate] = []
        finished: list[Request] = []
        for index, (req_id, new_token_ids) in enumerate(
            zip(model_runner_output.req_ids, model_runner_output.sampled_token_ids)
        ):
            request = requests.get(req_id)
            if request is None:
                continue
            if request.images:
                release_computed(request)
            if new_token_ids:
                new_token_ids = self._append_tokens(request, new_token_ids)
            new_logprobs = logprobs[index] if logprobs else None
            new_prompt_logprobs = prompt_logprobs[index] if prompt_logprobs else None
            if new_token_ids or new_logprobs or new_prompt_logprobs:
                status = request.status
                finish_reason = None if status is _RUNNING else status.finish_reason
                updates.append(
                    RequestUpdate(
                        req_id,
                        new_token_ids,
                        finish_reason,
                        request.stop_reason,
                        new_logprobs,
                        new_prompt_logprobs,
                        request.num_cached_tokens,
                    )
                )
                if finish_reason is not None:
                    finished.append(request)
        if finished:
            self.running = [r for r in self.running if r.status is _RUNNING]
            for request in finished:
                self._free_request(request)
        return updates

    def _append_tokens(self, request: Request, token_ids: list[int]) -> list[int]:
        """Appends sampled tokens up to the first that finishes the request; returns those
        appended. One set lookup and one comparison per token on the common path."""
        all_token_ids = request.all_token_ids
        if len(token_ids) == 1:
            token_id = token_ids[0]
            all_token_ids.append(token_id)
            if token_id in request.stop_token_set or len(all_token_ids) >= request.max_num_tokens:
                self._check_stop(request, token_id)
            return token_ids
        for count, token_id in enumerate(token_ids, 1):
            all_token_ids.append(token_id)
            if (
                token_id in request.stop_token_set or len(all_token_ids) >= request.max_num_tokens
            ) and self._check_stop(request, token_id):
                return token_ids[:count] if count < len(token_ids) else token_ids
        return token_ids

    def _check_stop(self, request: Request, token_id: int) -> bool:
        """Finishes the request if its last token ``token_id`` stops it. EOS (unless
        ``ignore_eos``) and the stop token ids count once ``min_tokens`` outputs exist, the
        stopping token included; otherwise ``max_tokens`` and ``max_model_len`` end it."""
        if token_id in request.stop_token_set and request.num_output_tokens >= request.min_tokens:
            request.status = RequestStatus.FINISHED_STOPPED
            if token_id in request.stop_token_ids:
                request.stop_reason = token_id
            return True
        if len(request.all_token_ids) >= request.max_num_tokens:
            request.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def _free_request(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        self.encoder_cache_manager.free(request)
        del self.requests[request.request_id]
        self._finished_req_ids.add(request.request_id)
