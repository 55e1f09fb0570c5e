"""A fake model runner and invariant checks for scheduler tests.

The fake runner keeps its own copy of every request from the scheduler's diffs (as a real
runner does) and asserts on every step that the diffs add up: block tables match the
scheduler's, computed counts agree, and every image placeholder in a scheduled range has its
encoder output in the runner's encoder cache.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from caldera.scheduler import (
    ImageFeature,
    ModelRunnerOutput,
    Request,
    RequestUpdate,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)


def make_request(
    req_id: str,
    prompt: int | list[int],
    *,
    max_tokens: int | None = 8,
    images: list[ImageFeature] = (),
    eos: int | None = None,
    arrival: float | None = None,
    priority: int = 0,
    **sampling: object,
) -> Request:
    """A request whose prompt is ``prompt`` (a list) or ``prompt`` tokens of its own (no two
    ids share a prefix)."""
    if isinstance(prompt, int):
        first = 1000 + 1000 * (zlib.crc32(req_id.encode()) % 10_000)
        prompt = list(range(first, first + prompt))
    tokens = prompt
    params = SimpleNamespace(max_tokens=max_tokens, **sampling)
    return Request(
        req_id,
        tokens,
        sampling_params=params,
        images=list(images),
        eos_token_id=eos,
        arrival_time=arrival,
        priority=priority,
    )


def image_prompt(
    text_before: int, image_len: int, text_after: int, placeholder: int = 32000
) -> list[int]:
    """Text tokens, ``image_len`` placeholder tokens, more text tokens."""
    return (
        list(range(1, text_before + 1))
        + [placeholder] * image_len
        + list(range(500, 500 + text_after))
    )


@dataclass
class _RunnerRequest:
    num_tokens: int
    num_computed: int
    block_ids: list[int]
    images: list[ImageFeature]


@dataclass
class FakeRunner:
    """Samples ``next_token(req_id)`` for each request that has computed all its tokens."""

    scheduler: Scheduler
    next_token: Callable[[str], int] = lambda req_id: 7
    requests: dict[str, _RunnerRequest] = field(default_factory=dict)
    encoder_cache: set[str] = field(default_factory=set)
    num_encoded: int = 0

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        req_ids, sampled = [], []
        for req_id, num in out.num_scheduled_tokens.items():
            state = self.requests[req_id]
            self._check_scheduled(req_id, state, num)
            state.num_computed += num
            req_ids.append(req_id)
            if state.num_computed >= state.num_tokens:
                sampled.append([self.next_token(req_id)])
                state.num_tokens += 1
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids, sampled, [None] * len(req_ids), [None] * len(req_ids))

    def _update_states(self, out: SchedulerOutput) -> None:
        for req_id in out.finished_req_ids:
            self.requests.pop(req_id, None)
        self.encoder_cache.difference_update(out.free_encoder_identifiers)
        for new in out.scheduled_new_reqs:
            assert new.req_id not in self.requests
            self.requests[new.req_id] = _RunnerRequest(
                len(new.prompt_token_ids), new.num_computed_tokens, list(new.block_ids), new.images
            )
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests[req_id]
            if cached.resumed_from_preemption[i]:
                state.block_ids = list(cached.new_block_ids[i])
                state.num_computed = cached.num_computed_tokens[i]
            else:
                assert state.num_computed == cached.num_computed_tokens[i]
                state.block_ids.extend(cached.new_block_ids[i])
        for req_id, indices in out.scheduled_encoder_inputs.items():
            for index in indices:
                identifier = self.requests[req_id].images[index].identifier
                assert identifier not in self.encoder_cache, f"{identifier} encoded twice"
                self.encoder_cache.add(identifier)
                self.num_encoded += 1

    def _check_scheduled(self, req_id: str, state: _RunnerRequest, num: int) -> None:
        request = self.scheduler.requests.get(req_id)
        if request is not None:  # else aborted after schedule(): the scheduler dropped it
            assert state.block_ids == [b.block_id for b in request.blocks]
        block_size = self.scheduler.config.block_size
        end = state.num_computed + num
        assert num > 0 and end <= state.num_tokens
        assert len(state.block_ids) * block_size >= end
        for image in state.images:
            if image.offset < end and image.end > state.num_computed:
                assert image.identifier in self.encoder_cache, (req_id, image)


def check_invariants(scheduler: Scheduler) -> None:
    """Block ref counts equal the number of holders; the free queue holds exactly the unused
    blocks; the prefix-cache index points at blocks with that hash."""
    pool = scheduler.kv_cache_manager.block_pool
    holders: dict[int, int] = {}
    for request in scheduler.requests.values():
        ids = [block.block_id for block in request.blocks]
        assert len(ids) == len(set(ids)), request
        if request.status.name != "RUNNING":
            assert not ids, request
        for block_id in ids:
            holders[block_id] = holders.get(block_id, 0) + 1
    for block in pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), block
        if block.ref_cnt > 1:
            assert block.block_hash is not None, block
    assert sorted(pool.free_block_ids()) == [b.block_id for b in pool.blocks if b.ref_cnt == 0]
    for block_hash, block in pool._cached.items():
        assert block.block_hash == block_hash
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    statuses = {r.status.name for r in scheduler.running}
    assert statuses <= {"RUNNING"}, statuses


def assert_all_blocks_free(scheduler: Scheduler) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    assert all(block.ref_cnt == 0 for block in pool.blocks)
    assert sorted(pool.free_block_ids()) == list(range(pool.num_blocks))
    assert pool.num_free_blocks == pool.num_blocks
    assert scheduler.kv_cache_manager.usage == 0.0
    assert scheduler.encoder_cache_manager.usage == 0.0


class Harness:
    """A scheduler, a fake runner, and per-step checks of budgets and invariants."""

    def __init__(self, **config: object) -> None:
        config.setdefault("num_gpu_blocks", 64)
        config.setdefault("max_model_len", 256)
        self.config = SchedulerConfig(**config)
        self.scheduler = Scheduler(self.config)
        self.runner = FakeRunner(self.scheduler)
        self.outputs: dict[str, list[int]] = {}
        self.finish_reasons: dict[str, str] = {}

    def add(self, request: Request) -> Request:
        self.scheduler.add_request(request)
        return request

    def schedule(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        config = self.config
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= config.max_num_seqs
        encoded = sum(
            self.scheduler.requests[req_id].images[i].length
            for req_id, indices in out.scheduled_encoder_inputs.items()
            for i in indices
        )
        assert encoded <= config.encoder_budget
        check_invariants(self.scheduler)
        return out

    def update(self, out: SchedulerOutput) -> list[RequestUpdate]:
        updates = self.scheduler.update_from_output(out, self.runner.execute(out))
        for update in updates:
            self.outputs.setdefault(update.req_id, []).extend(update.new_token_ids)
            if update.finish_reason is not None:
                self.finish_reasons[update.req_id] = str(update.finish_reason)
        check_invariants(self.scheduler)
        return updates

    def step(self) -> tuple[SchedulerOutput, list[RequestUpdate]]:
        out = self.schedule()
        return out, self.update(out)

    def run_to_completion(self, max_steps: int = 1000) -> int:
        steps = 0
        while self.scheduler.has_unfinished_requests():
            self.step()
            steps += 1
            assert steps < max_steps, "requests did not finish"
        return steps


@pytest.fixture
def harness() -> Callable[..., Harness]:
    return Harness


@pytest.fixture
def req() -> Callable[..., Request]:
    return make_request


@pytest.fixture
def img_prompt() -> Callable[..., list[int]]:
    return image_prompt


@pytest.fixture
def all_free() -> Callable[[Scheduler], None]:
    return lambda h: assert_all_blocks_free(h.scheduler)
