"""Prefix-cache hits on shared prompts and repeated images; encoder budget and cache sharing."""

from __future__ import annotations

from caldera.scheduler import ImageFeature


def _image(identifier: str, offset: int, length: int) -> ImageFeature:
    return ImageFeature(identifier=identifier, offset=offset, length=length)


def test_shared_prefix_is_computed_once(harness, req):
    h = harness(block_size=16)
    shared = list(range(64))
    h.add(req("first", shared + [1, 2, 3], max_tokens=1))
    h.run_to_completion()
    h.add(req("second", shared + [4, 5], max_tokens=1))
    out, _ = h.step()
    (new,) = out.scheduled_new_reqs
    assert new.num_computed_tokens == 64
    assert out.num_scheduled_tokens == {"second": 2}
    assert h.scheduler.get_stats().prefix_cache_hits == 64


def test_whole_prompt_hit_still_computes_the_last_token(harness, req):
    h = harness(block_size=16)
    prompt = list(range(48))
    h.add(req("first", prompt, max_tokens=1))
    h.run_to_completion()
    h.add(req("again", prompt, max_tokens=1))
    out, updates = h.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 32
    assert out.num_scheduled_tokens == {"again": 16}
    assert updates[0].new_token_ids == [7]


def test_n_children_share_the_prompt_blocks_in_the_same_step(harness, req):
    h = harness(block_size=16)
    prompt = list(range(50))
    for i in range(3):
        h.add(req(f"c{i}", prompt, max_tokens=3))
    out, _ = h.step()
    computed = [new.num_computed_tokens for new in out.scheduled_new_reqs]
    assert computed == [0, 48, 48]
    first, second, third = (h.scheduler.requests[f"c{i}"] for i in range(3))
    assert first.blocks[:3] == second.blocks[:3] == third.blocks[:3]
    assert first.blocks[3] is not second.blocks[3]
    h.run_to_completion()


def test_disabled_prefix_caching_never_hits(harness, req):
    h = harness(enable_prefix_caching=False)
    prompt = list(range(64))
    h.add(req("a", prompt, max_tokens=1))
    h.run_to_completion()
    h.add(req("b", prompt, max_tokens=1))
    out, _ = h.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert h.scheduler.kv_cache_manager.block_pool._cached == {}


def test_repeated_image_hits_and_a_different_image_misses(harness, req, img_prompt):
    h = harness(block_size=16)
    prompt = img_prompt(5, 40, 20)  # the placeholder ids are the same for every image
    h.add(req("cat", prompt, images=[_image("cat", 5, 40)], max_tokens=1))
    h.run_to_completion()
    assert h.runner.num_encoded == 1

    h.add(req("cat-again", prompt, images=[_image("cat", 5, 40)], max_tokens=1))
    out, _ = h.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 64
    assert out.scheduled_encoder_inputs == {}  # its placeholder is all cached KV

    h.add(req("dog", prompt, images=[_image("dog", 5, 40)], max_tokens=1))
    out, _ = h.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 0
    assert out.scheduled_encoder_inputs == {"dog": [0]}
    h.run_to_completion()


def test_text_before_the_image_is_shared_across_images(harness, req, img_prompt):
    h = harness(block_size=16)
    prompt = img_prompt(40, 30, 10)  # blocks 0 and 1 are text only
    h.add(req("cat", prompt, images=[_image("cat", 40, 30)], max_tokens=1))
    h.run_to_completion()
    h.add(req("dog", prompt, images=[_image("dog", 40, 30)], max_tokens=1))
    out, _ = h.step()
    assert out.scheduled_new_reqs[0].num_computed_tokens == 32
    h.run_to_completion()


def test_chunk_stops_at_a_placeholder_the_encoder_budget_cannot_cover(harness, req, img_prompt):
    h = harness(max_num_batched_tokens=512, encoder_budget=100, encoder_cache_size=400)
    prompt = img_prompt(10, 60, 5) + img_prompt(10, 80, 5)
    images = [_image("a", 10, 60), _image("b", 85, 80)]
    h.add(req("r", prompt, images=images, max_tokens=1))
    out, _ = h.step()
    # Image a (60) fits the budget of 100, image b (80) does not: stop at b's placeholder.
    assert out.scheduled_encoder_inputs == {"r": [0]}
    assert out.num_scheduled_tokens == {"r": 85}
    out, _ = h.step()
    assert out.scheduled_encoder_inputs == {"r": [1]}
    assert out.num_scheduled_tokens == {"r": 170 - 85}
    h.run_to_completion()


def test_a_chunk_may_end_inside_an_encoded_image(harness, req, img_prompt):
    h = harness(max_num_batched_tokens=30)
    h.add(req("r", img_prompt(10, 50, 5), images=[_image("a", 10, 50)], max_tokens=1))
    out, _ = h.step()
    assert out.num_scheduled_tokens == {"r": 30}
    assert out.scheduled_encoder_inputs == {"r": [0]}
    out, _ = h.step()
    assert out.scheduled_encoder_inputs == {}  # still cached: the runner checks it
    h.run_to_completion()
    assert h.runner.num_encoded == 1


def test_one_encoding_serves_every_request_with_the_image(harness, req, img_prompt):
    h = harness(max_num_batched_tokens=1024, encoder_budget=64, encoder_cache_size=64)
    for i in range(3):
        prompt = [100 + i] * 3 + img_prompt(0, 60, 4)  # distinct text: no prefix hit
        h.add(req(f"r{i}", prompt, images=[_image("same", 3, 60)], max_tokens=2))
    out, _ = h.step()
    assert out.scheduled_encoder_inputs == {"r0": [0]}
    assert len(out.num_scheduled_tokens) == 3
    h.run_to_completion()
    assert h.runner.num_encoded == 1


def test_encoder_cache_room_limits_new_images_and_frees_old_ones(harness, req, img_prompt):
    h = harness(max_num_batched_tokens=1024, encoder_budget=100, encoder_cache_size=100)
    h.add(req("a", img_prompt(2, 60, 2), images=[_image("a", 2, 60)], max_tokens=1))
    h.add(req("b", img_prompt(3, 60, 2), images=[_image("b", 3, 60)], max_tokens=1))
    out, _ = h.step()
    # b's image does not fit next to a's: b computes its text up to the placeholder.
    assert out.scheduled_encoder_inputs == {"a": [0]}
    assert out.num_scheduled_tokens == {"a": 64, "b": 3}
    out, _ = h.step()
    assert out.scheduled_encoder_inputs == {"b": [0]}
    assert out.free_encoder_identifiers == ["a"]
    h.run_to_completion()


def test_unused_encoder_output_is_reused_by_a_later_request(harness, req, img_prompt):
    h = harness(enable_prefix_caching=False)
    prompt = img_prompt(2, 30, 2)
    h.add(req("a", prompt, images=[_image("x", 2, 30)], max_tokens=1))
    h.run_to_completion()
    h.add(req("b", prompt, images=[_image("x", 2, 30)], max_tokens=1))
    out, _ = h.step()
    assert out.scheduled_encoder_inputs == {}
    assert h.runner.num_encoded == 1


def test_the_same_image_twice_in_one_request_is_encoded_once(harness, req, img_prompt):
    h = harness(max_num_batched_tokens=40)
    prompt = img_prompt(2, 20, 2) + img_prompt(2, 20, 2)
    images = [_image("x", 2, 20), _image("x", 26, 20)]
    h.add(req("r", prompt, images=images, max_tokens=1))
    h.run_to_completion()
    assert h.runner.num_encoded == 1


def test_preempted_request_resumes_with_its_image(harness, req, img_prompt):
    h = harness(block_size=4, num_gpu_blocks=16, max_model_len=64, enable_prefix_caching=False)
    prompt = img_prompt(4, 20, 4)
    h.add(req("a", prompt, images=[_image("x", 4, 20)], max_tokens=30, arrival=2.0))
    h.add(req("b", list(range(28)), max_tokens=30, arrival=1.0))
    h.run_to_completion()  # the fake runner checks the image is cached whenever needed
    assert h.scheduler.num_preemptions > 0
    assert h.scheduler.requests == {}
    assert h.scheduler.encoder_cache_manager.usage == 0.0
