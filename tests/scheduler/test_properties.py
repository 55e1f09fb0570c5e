"""Random add / step / abort / finish sequences: invariants hold after every operation and
every block is free once all requests are gone."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from caldera.scheduler import ImageFeature, RequestStatus

_IMAGES = ["red", "green", "blue"]

_add = st.tuples(
    st.just("add"),
    st.integers(1, 80),  # prompt length
    st.integers(1, 20),  # max_tokens
    st.integers(0, 1),  # shared-prefix family
    st.sampled_from([None, *_IMAGES]),
    st.integers(0, 2),  # priority
    st.integers(1, 4),  # copies (like n > 1)
)
_step = st.tuples(st.just("step"), st.integers(1, 3))
_abort = st.tuples(st.just("abort"), st.integers(0, 50))
_finish = st.tuples(st.just("finish"), st.integers(0, 50))
_abort_mid_step = st.tuples(st.just("abort_mid_step"), st.integers(0, 50))
_ops = st.lists(
    st.one_of(_add, _add, _step, _step, _abort, _finish, _abort_mid_step), min_size=4, max_size=40
)


def _prompt(length: int, family: int, image: str | None) -> tuple[list[int], list[ImageFeature]]:
    tokens = [family * 100 + i % 7 for i in range(length)]
    images = []
    if image is not None and length >= 12:
        offset, size = length // 4, length // 2
        tokens[offset : offset + size] = [32000] * size
        images.append(ImageFeature(image, offset, size))
    return tokens, images


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ops=_ops,
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    threshold=st.sampled_from([0, 8]),
)
def test_random_operations_leave_every_block_free(
    harness, req, all_free, ops, policy, caching, threshold
):
    h = harness(
        block_size=4,
        num_gpu_blocks=25,
        max_model_len=100,
        max_num_batched_tokens=48,
        max_num_seqs=4,
        encoder_budget=40,
        encoder_cache_size=60,
        policy=policy,
        enable_prefix_caching=caching,
        long_prefill_token_threshold=threshold,
    )
    ids: list[str] = []
    for op in ops:
        kind = op[0]
        if kind == "add":
            _, length, max_tokens, family, image, priority, copies = op
            tokens, images = _prompt(length, family, image)
            for _ in range(copies):
                ids.append(f"r{len(ids)}")
                h.add(req(ids[-1], tokens, max_tokens=max_tokens, images=images, priority=priority))
        elif kind == "step":
            for _ in range(op[1]):
                h.step()
        elif ids and kind in ("abort", "finish"):
            status = RequestStatus.FINISHED_ABORTED
            if kind == "finish":
                status = RequestStatus.FINISHED_STOPPED
            h.scheduler.finish_requests(ids[op[1] % len(ids)], status)
        elif ids:
            out = h.schedule()
            h.scheduler.finish_requests(ids[op[1] % len(ids)])
            h.update(out)
    h.run_to_completion(max_steps=2000)
    stats = h.scheduler.get_stats()
    event(f"preempted: {stats.num_preemptions > 0}")
    event(f"prefix hits: {stats.prefix_cache_hits > 0}")
    event(f"images encoded: {h.runner.num_encoded > 0}")
    h.step()  # flushes the last finished ids to the runner
    assert h.runner.requests == {}
    all_free(h)
