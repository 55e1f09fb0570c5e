"""The image pool: what its worker processes return is what in-process preprocessing gives;
bad images raise the media errors the server maps to 400 / 413; a dead worker is replaced and
the image it held is tried again."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from caldera.engine.image_pool import ImagePool
from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig
from caldera.engine.media import MediaError, MediaTooLargeError, decode_image
from caldera.engine.processor import prepare_image


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def config(next_mistral_dir) -> ImageProcessorConfig:
    return ImageProcessorConfig.from_model_dir(next_mistral_dir)


@pytest.fixture(scope="module")
def pool(config):
    pool = ImagePool(config, workers=1, max_pixels=1_000_000)
    yield pool
    pool.shutdown()


def _run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("base_only", [False, True])
def test_worker_output_equals_in_process(pool, config, base_only):
    data = _png(320, 200, seed=1)
    expected = prepare_image(ImageProcessor(config), decode_image(data), base_only)
    result = _run(pool.prepare(data, base_only))
    assert result.image.identifier == expected.identifier
    assert result.image.processed.image_size == expected.processed.image_size
    assert result.image.processed.base_only == expected.processed.base_only
    assert torch.equal(result.image.processed.pixel_values, expected.processed.pixel_values)
    assert result.decode_seconds >= 0 and result.preprocess_seconds >= 0


def test_threads_when_no_workers(config):
    data = _png(64, 48, seed=2)
    threaded = ImagePool(config, workers=0, max_pixels=1_000_000)
    result = _run(threaded.prepare(data, False))
    expected = prepare_image(ImageProcessor(config), decode_image(data), False)
    assert torch.equal(result.image.processed.pixel_values, expected.processed.pixel_values)
    threaded.shutdown()


def test_bad_images_raise_media_errors(pool):
    with pytest.raises(MediaError, match="not a valid"):
        _run(pool.prepare(b"definitely not an image", False))
    with pytest.raises(MediaError, match="truncated or corrupt"):
        _run(pool.prepare(_png(64, 64)[:200], False))
    with pytest.raises(MediaTooLargeError, match="over the limit"):
        _run(pool.prepare(_png(1200, 1000), False))
    assert _run(pool.prepare(_png(32, 32), False)).image.identifier  # still serving


def _kill_workers(pool: ImagePool) -> None:
    for pid in list(pool._executor._processes):
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.kill(pid, signal.SIGKILL)


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 80, 40)).save(out, format="JPEG")
    return out.getvalue()


def test_a_dead_worker_is_replaced(config):
    pool = ImagePool(config, workers=1, max_pixels=100_000_000)
    try:
        assert _run(pool.prepare(_png(32, 32), False))  # the worker is up
        # Killed while idle: the next image is served, by a new worker.
        _kill_workers(pool)
        assert _run(pool.prepare(_png(40, 30), False)).image.processed.image_size == (30, 40)

        async def kill_mid_task():  # a 24-megapixel image keeps the worker busy a while
            job = asyncio.ensure_future(pool.prepare(_jpeg(6000, 4000), False))
            await asyncio.sleep(0.05)
            _kill_workers(pool)
            return await job

        # Killed while holding an image: it is tried again on a new worker.
        assert _run(kill_mid_task()).image.processed.image_size == (4000, 6000)
    finally:
        pool.shutdown()


# ---- the cache of prepared images ------------------------------------------------------------


def test_an_image_sent_again_comes_from_the_cache(config):
    pool = ImagePool(config, workers=0, max_pixels=1_000_000)

    async def scenario():
        data = _png(96, 64, seed=3)
        first = await pool.prepare(data, False)
        again = await pool.prepare(bytes(data), False)  # equal bytes, another object
        low = await pool.prepare(data, True)  # another detail: prepared anew
        return first, again, low

    first, again, low = _run(scenario())
    assert not first.cached and again.cached and not low.cached
    assert again.image is first.image and again.decode_seconds == 0.0
    assert low.image.identifier != first.image.identifier


def test_identical_images_arriving_together_are_prepared_once(config):
    pool = ImagePool(config, workers=0, max_pixels=1_000_000)
    data = _png(120, 90, seed=4)

    async def scenario():
        return await asyncio.gather(*(pool.prepare(data, False) for _ in range(4)))

    results = _run(scenario())
    assert [r.cached for r in results].count(False) == 1
    assert len({id(r.image) for r in results}) == 1


def test_a_request_that_leaves_does_not_cancel_the_others(config):
    pool = ImagePool(config, workers=0, max_pixels=100_000_000)
    data = _jpeg(3000, 2000)

    async def scenario():
        leaving = asyncio.ensure_future(pool.prepare(data, False))
        await asyncio.sleep(0)
        staying = asyncio.ensure_future(pool.prepare(data, False))
        await asyncio.sleep(0.01)
        leaving.cancel()
        result = await staying
        return leaving.cancelled(), result

    cancelled, result = _run(scenario())
    assert cancelled and result.image.processed.image_size == (2000, 3000)
    assert _run(pool.prepare(data, False)).cached  # and it was kept


def test_the_cache_keeps_to_its_size_least_recently_used_out(config):
    one = _run(ImagePool(config, workers=0, max_pixels=1_000_000).prepare(_png(8, 8), False))
    nbytes = one.image.processed.pixel_values.numel() * 4  # every image is the same tiles
    pool = ImagePool(config, workers=0, max_pixels=1_000_000, cache_bytes=2 * nbytes)
    images = [_png(32, 32, seed=10 + i) for i in range(3)]

    async def scenario():
        await pool.prepare(images[0], False)
        await pool.prepare(images[1], False)
        assert (await pool.prepare(images[0], False)).cached  # now the most recent
        await pool.prepare(images[2], False)  # evicts images[1]
        return [(await pool.prepare(images[i], False)).cached for i in (0, 2, 1)]

    assert _run(scenario()) == [True, True, False]
    assert pool._cache.size <= 2 * nbytes

    uncached = ImagePool(config, workers=0, max_pixels=1_000_000, cache_bytes=0)
    assert not _run(uncached.prepare(images[0], False)).cached
    assert not _run(uncached.prepare(images[0], False)).cached


def test_a_bad_image_is_refused_every_time_and_nothing_is_kept(config):
    pool = ImagePool(config, workers=0, max_pixels=1_000_000)

    async def scenario():
        for _ in range(2):
            with pytest.raises(MediaError, match="not a valid"):
                await pool.prepare(b"still not an image", False)
        return len(pool._cache), len(pool._pending)

    assert _run(scenario()) == (0, 0)
