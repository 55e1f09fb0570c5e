"""Aborting (or finishing upstream) a request in every state returns everything it holds."""

from __future__ import annotations

from caldera.scheduler import ImageFeature, RequestStatus


def _finish(h, req_id, status=RequestStatus.FINISHED_ABORTED):
    h.scheduler.finish_requests(req_id, status)


def test_abort_while_waiting(harness, req, all_free):
    h = harness(max_num_seqs=1)
    h.add(req("a", 10))
    h.add(req("b", 10))
    h.step()
    _finish(h, "b")
    assert h.scheduler.get_stats().num_waiting_reqs == 0
    out = h.schedule()
    assert "b" in out.finished_req_ids and "b" not in out.num_scheduled_tokens
    h.update(out)
    h.run_to_completion()
    all_free(h)


def test_abort_during_chunked_prefill(harness, req, all_free):
    h = harness(max_num_batched_tokens=16, encoder_budget=64, encoder_cache_size=64)
    h.add(req("a", 100, images=[ImageFeature("img", 20, 40)]))
    h.step()
    h.step()  # the chunk reaches the image: it is encoded and held
    assert h.scheduler.encoder_cache_manager.usage > 0
    _finish(h, "a")
    out = h.schedule()
    assert out.finished_req_ids == {"a"} and out.num_scheduled_tokens == {}
    all_free(h)


def test_abort_while_decoding_and_stop_string_finish(harness, req, all_free):
    h = harness()
    h.add(req("a", 10, max_tokens=50))
    h.add(req("b", 10, max_tokens=50))
    for _ in range(3):
        h.step()
    _finish(h, "a")
    _finish(h, ["b", "unknown"], RequestStatus.FINISHED_STOPPED)
    _finish(h, "a")  # twice: ignored
    assert not h.scheduler.has_unfinished_requests()
    assert h.scheduler.has_finished_requests()
    assert h.schedule().finished_req_ids == {"a", "b"}
    all_free(h)


def test_abort_while_preempted(harness, req, all_free):
    h = harness(block_size=4, num_gpu_blocks=8, max_model_len=32)
    h.add(req("early", 14, max_tokens=10, arrival=1.0))
    h.add(req("late", 14, max_tokens=10, arrival=2.0))
    while h.scheduler.requests["late"].status != RequestStatus.PREEMPTED:
        h.step()
    _finish(h, "late")
    h.run_to_completion()
    assert len(h.outputs["early"]) == 10
    all_free(h)


def test_abort_between_schedule_and_update(harness, req, all_free):
    h = harness()
    h.add(req("a", 10, max_tokens=5))
    h.add(req("b", 10, max_tokens=5))
    out = h.schedule()
    _finish(h, "a")
    updates = h.update(out)
    assert [u.req_id for u in updates] == ["b"]
    h.run_to_completion()
    assert "a" not in h.outputs
    all_free(h)


def test_finish_requires_a_finished_status(harness):
    h = harness()
    try:
        h.scheduler.finish_requests("a", RequestStatus.RUNNING)
    except ValueError as error:
        assert "finished status" in str(error)
    else:
        raise AssertionError("RUNNING accepted as a finish status")
