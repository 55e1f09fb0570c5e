"""EncoderCacheManager on its own: plans, sharing, release and LRU eviction."""

from __future__ import annotations

from caldera.scheduler import EncoderCacheManager, ImageFeature, Request


def _request(req_id: str, *images: tuple[str, int, int]) -> Request:
    features = [ImageFeature(identifier, offset, length) for identifier, offset, length in images]
    return Request(req_id, [0] * 200, images=features)


def test_plan_cuts_at_the_first_image_that_does_not_fit():
    cache = EncoderCacheManager(cache_size=100)
    request = _request("r", ("a", 10, 30), ("b", 50, 30))
    plan = cache.plan(request, start=0, num_tokens=200, budget=40)
    assert (plan.num_tokens, plan.to_encode, plan.num_encoder_tokens) == (50, [0], 30)
    plan = cache.plan(request, start=20, num_tokens=10, budget=0)  # mid image a, uncached
    assert plan.num_tokens == 0


def test_shared_image_is_held_until_every_user_computed_it():
    cache = EncoderCacheManager(cache_size=100)
    first, second = _request("1", ("x", 0, 50)), _request("2", ("x", 5, 50))
    plan = cache.plan(first, 0, 60, budget=100)
    cache.commit(first, plan)
    plan = cache.plan(second, 0, 10, budget=100)
    assert plan.to_encode == [] and plan.cached == [0]
    cache.commit(second, plan)
    first.num_computed_tokens = 60
    cache.release_computed(first)
    assert cache.usage == 0.5
    second.num_computed_tokens = 10
    cache.release_computed(second)  # its placeholder ends at 55: still needed
    assert cache.usage == 0.5
    second.num_computed_tokens = 55
    cache.release_computed(second)
    assert cache.usage == 0.0 and cache.is_cached("x")  # unused, kept until room is needed
    assert cache.take_freed_identifiers() == []


def test_room_comes_from_evicting_unused_entries_in_lru_order():
    cache = EncoderCacheManager(cache_size=100)
    for name in ("a", "b"):
        request = _request(name, (name, 0, 50))
        cache.commit(request, cache.plan(request, 0, 50, budget=100))
        cache.free(request)
    cache.commit(_request("c", ("a", 0, 50)), cache.plan(_request("c", ("a", 0, 50)), 0, 1, 100))
    newcomer = _request("d", ("d", 0, 50))
    plan = cache.plan(newcomer, 0, 50, budget=100)
    assert plan.to_encode == [0]
    cache.commit(newcomer, plan)
    assert cache.take_freed_identifiers() == ["b"]  # "a" is in use again
    assert cache.take_freed_identifiers() == []


def test_an_image_evicted_and_needed_again_in_one_step_is_not_re_encoded():
    cache = EncoderCacheManager(cache_size=100)
    for name in ("a", "b"):
        request = _request(name, (name, 0, 50))
        cache.commit(request, cache.plan(request, 0, 50, budget=100))
        cache.free(request)
    first = _request("1", ("c", 0, 50))
    cache.commit(first, cache.plan(first, 0, 50, budget=100))  # evicts "a"
    second = _request("2", ("a", 0, 50))
    plan = cache.plan(second, 0, 50, budget=100)
    assert plan.to_encode == [0]
    cache.commit(second, plan)  # evicts "b"; the runner was never told to drop "a"
    assert plan.to_encode == [] and plan.num_encoder_tokens == 0
    assert cache.take_freed_identifiers() == ["b"]
