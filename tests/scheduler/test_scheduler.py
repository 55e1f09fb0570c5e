"""Scheduler behaviour with a fake runner: budgets, chunked prefill, preemption, stop rules."""

from __future__ import annotations

import pytest

from caldera.scheduler import RequestStatus, SchedulerConfig


def test_budget_and_max_num_seqs_are_never_exceeded(harness, req):
    h = harness(max_num_batched_tokens=64, max_num_seqs=3, num_gpu_blocks=128)
    for i in range(8):
        h.add(req(f"r{i}", 40 + 7 * i, max_tokens=5))
    h.run_to_completion()  # the harness checks both limits on every step
    assert all(len(h.outputs[f"r{i}"]) == 5 for i in range(8))
    assert set(h.finish_reasons.values()) == {"length"}


def test_decodes_and_prefill_chunks_share_a_step(harness, req):
    h = harness(max_num_batched_tokens=32, num_gpu_blocks=64)
    h.add(req("a", 10, max_tokens=4))
    h.step()
    h.add(req("b", 100, max_tokens=2))
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 31}
    assert out.scheduled_cached_reqs.req_ids == ["a"]
    assert [new.req_id for new in out.scheduled_new_reqs] == ["b"]


def test_chunked_prefill_samples_only_after_the_last_chunk(harness, req):
    h = harness(max_num_batched_tokens=40, num_gpu_blocks=64)
    h.add(req("a", 100, max_tokens=3))
    chunks = []
    for _ in range(3):
        out, updates = h.step()
        chunks.append(out.num_scheduled_tokens["a"])
        sampled = [u.new_token_ids for u in updates]
        assert sampled == ([[7]] if sum(chunks) == 100 else [])
    assert chunks == [40, 40, 20]
    out, updates = h.step()
    assert out.num_scheduled_tokens == {"a": 1}
    assert updates[0].new_token_ids == [7]
    assert out.scheduled_cached_reqs.num_computed_tokens == [100]


def test_long_prefill_threshold_caps_each_chunk(harness, req):
    h = harness(max_num_batched_tokens=100, long_prefill_token_threshold=16)
    h.add(req("a", 50))
    h.add(req("b", 50))
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"a": 16, "b": 16}


def test_new_requests_are_sent_whole_then_as_diffs(harness, req):
    h = harness(block_size=4, num_gpu_blocks=32, max_model_len=64)
    a = h.add(req("a", 6, max_tokens=10))
    out, _ = h.step()
    (new,) = out.scheduled_new_reqs
    assert new.prompt_token_ids == a.prompt_token_ids and len(a.prompt_token_ids) == 6
    assert len(new.block_ids) == 2 and new.num_computed_tokens == 0
    grown = []
    for _ in range(4):
        out, _ = h.step()
        assert out.scheduled_new_reqs == []
        grown.append(len(out.scheduled_cached_reqs.new_block_ids[0]))
    # Tokens 6, 7, 8, 9 are computed: a new block is needed only for token 8.
    assert grown == [0, 0, 1, 0]


def test_preemption_frees_the_latest_arrival_and_it_resumes(harness, req):
    # 8 blocks of 4 tokens; two requests of 14 prompt tokens need 4 blocks each at first.
    h = harness(block_size=4, num_gpu_blocks=8, max_model_len=32)
    h.add(req("early", 14, max_tokens=8, arrival=1.0))
    h.add(req("late", 14, max_tokens=8, arrival=2.0))
    preempted_at = None
    for step in range(20):
        out, _ = h.step()
        late = h.scheduler.requests.get("late")
        if late is not None and late.status == RequestStatus.PREEMPTED and preempted_at is None:
            preempted_at = step
            assert "late" not in out.num_scheduled_tokens
            assert late.num_computed_tokens == 0 and late.blocks == []
            assert out.scheduled_new_reqs == []  # no new work starts in a preempting step
        cached = out.scheduled_cached_reqs
        if "late" in cached.req_ids and preempted_at is not None:
            i = cached.req_ids.index("late")
            if cached.resumed_from_preemption[i]:
                assert cached.new_block_ids[i] == [b.block_id for b in late.blocks]
                break
    else:
        pytest.fail("late was never resumed")
    h.run_to_completion()
    assert h.outputs == {"early": [7] * 8, "late": [7] * 8}
    assert h.scheduler.get_stats().num_preemptions >= 1


def test_preemption_under_priority_policy_picks_the_lowest_priority(harness, req):
    h = harness(block_size=4, num_gpu_blocks=8, max_model_len=32, policy="priority")
    h.add(req("urgent", 14, max_tokens=8, arrival=2.0, priority=0))
    h.add(req("lazy", 14, max_tokens=8, arrival=1.0, priority=5))
    while h.scheduler.get_stats().num_preemptions == 0:
        h.step()
    assert h.scheduler.requests["lazy"].status == RequestStatus.PREEMPTED
    assert h.scheduler.requests["urgent"].status == RequestStatus.RUNNING
    h.run_to_completion()
    assert len(h.outputs["lazy"]) == len(h.outputs["urgent"]) == 8


def test_priority_policy_starts_lower_values_first(harness, req):
    h = harness(max_num_seqs=1, policy="priority")
    h.add(req("low", 8, max_tokens=1, arrival=1.0, priority=3))
    h.add(req("high", 8, max_tokens=1, arrival=2.0, priority=1))
    h.add(req("high2", 8, max_tokens=1, arrival=3.0, priority=1))
    order = [h.step()[0].scheduled_new_reqs[0].req_id for _ in range(3)]
    assert order == ["high", "high2", "low"]


def test_fcfs_starts_in_arrival_order_and_blocks_behind_the_head(harness, req):
    h = harness(max_num_seqs=1)
    h.add(req("b", 8, max_tokens=1, arrival=2.0))
    h.add(req("a", 8, max_tokens=1, arrival=1.0))
    assert h.step()[0].scheduled_new_reqs[0].req_id == "a"
    assert h.step()[0].scheduled_new_reqs[0].req_id == "b"


@pytest.mark.parametrize(
    ("sampling", "tokens", "expected", "reason"),
    [
        ({}, [5, 2, 5], [5, 2], "stop"),  # eos = 2
        ({"ignore_eos": True}, [5, 2, 5, 5], [5, 2, 5, 5], "length"),
        ({"stop_token_ids": [9]}, [5, 9, 5], [5, 9], "stop"),
        ({"stop_token_ids": [9], "min_tokens": 3}, [9, 9, 9, 9], [9, 9, 9], "stop"),
        ({"min_tokens": 2}, [2, 2, 2], [2, 2], "stop"),
        ({}, [5, 5, 5, 5, 5], [5, 5, 5, 5], "length"),  # max_tokens = 4
    ],
)
def test_stop_rules(harness, req, sampling, tokens, expected, reason):
    h = harness()
    h.add(req("a", 10, max_tokens=4, eos=2, **sampling))
    stream = iter(tokens)
    h.runner.next_token = lambda req_id: next(stream)
    h.run_to_completion()
    assert h.outputs["a"] == expected
    assert h.finish_reasons["a"] == reason


def test_stop_token_is_reported_as_stop_reason(harness, req):
    h = harness()
    h.add(req("a", 10, stop_token_ids=[7]))
    _, updates = h.step()
    assert updates[0].stop_reason == 7 and str(updates[0].finish_reason) == "stop"


def test_stops_at_max_model_len(harness, req):
    h = harness(max_model_len=20, num_gpu_blocks=4, block_size=8)
    h.add(req("a", 17, max_tokens=None))
    h.run_to_completion()
    assert h.outputs["a"] == [7, 7, 7]
    assert h.finish_reasons["a"] == "length"


def test_add_request_rejects_what_can_never_run(harness, req):
    h = harness(max_model_len=32, encoder_budget=100)
    with pytest.raises(ValueError, match="max_model_len"):
        h.add(req("long", 33))
    h.add(req("a", 8))
    with pytest.raises(ValueError, match="already in use"):
        h.add(req("a", 8))


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(num_gpu_blocks=100, policy="lifo")
    with pytest.raises(ValueError, match="at least 256 blocks"):
        SchedulerConfig(num_gpu_blocks=10, max_model_len=4096)
    with pytest.raises(ValueError, match="max_num_seqs"):
        SchedulerConfig(num_gpu_blocks=300, max_num_seqs=0)


def test_stats(harness, req):
    h = harness(num_gpu_blocks=64, block_size=16, max_num_seqs=1)
    h.add(req("a", list(range(40)), max_tokens=2))
    h.add(req("b", list(range(40)), max_tokens=2))
    h.step()
    stats = h.scheduler.get_stats()
    assert (stats.num_running_reqs, stats.num_waiting_reqs) == (1, 1)
    assert stats.kv_cache_usage == pytest.approx(3 / 64)
    h.run_to_completion()
    stats = h.scheduler.get_stats()
    assert stats.prefix_cache_queries == 80 and stats.prefix_cache_hits == 32
    assert stats.prefix_cache_hit_rate == pytest.approx(0.4)
    assert stats.kv_cache_usage == 0.0
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.get_num_unfinished_requests() == 0


def test_logprobs_pass_through_and_partial_prefills_report_prompt_logprobs(harness, req):
    from caldera.scheduler import Logprobs, ModelRunnerOutput

    h = harness(max_num_batched_tokens=8)
    h.add(req("a", 12, max_tokens=1))
    prompt_lp = [Logprobs(1, -0.5, 1, [], [])]
    out = h.schedule()
    h.runner.execute(out)
    updates = h.scheduler.update_from_output(
        out, ModelRunnerOutput(["a"], [[]], [None], [prompt_lp])
    )
    assert [(u.new_token_ids, u.prompt_logprobs, u.finish_reason) for u in updates] == [
        ([], prompt_lp, None)
    ]
    out = h.schedule()
    h.runner.execute(out)
    sample_lp = [Logprobs(7, -0.1, 1, [7], [-0.1])]
    (update,) = h.scheduler.update_from_output(
        out, ModelRunnerOutput(["a"], [[7]], [sample_lp], [None])
    )
    assert update.new_token_ids == [7] and update.new_logprobs == sample_lp
    assert update.finished and str(update.finish_reason) == "length"
