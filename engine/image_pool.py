"""ImagePool: image decoding and preprocessing in worker processes.

The server's event loop streams every response; a 2000x1500 JPEG costs about 80 ms of CPU to
decode, resize, normalise and hash. In a thread of the API process that work holds the
interpreter lock for most of those 80 ms and the streams beside it stall. Here it runs in
worker processes (spawned, one torch thread each, at a lower CPU priority than the engine and
the event loop), and only the encoded bytes go in and the pixel array comes back.

Images sent again (the same encoded bytes at the same detail) are served from a cache of
prepared images, bounded in bytes, without decoding them again; identical images that arrive
together are prepared once. The key is the sha256 of the bytes, a millisecond per megabyte.

The workers start with the pool and load nothing but the image processor's config. With no
workers the same work runs in threads of the calling process. When a worker dies (the kernel's
OOM killer on a hostile image, say) the pool starts afresh and the images it held are tried
once more; an image that kills its worker twice fails with a MediaError.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import multiprocessing
import os
import signal
import time
from collections import OrderedDict
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig, ProcessedImage
from caldera.engine.media import MediaError, decode_image
from caldera.engine.parent_watch import exit_when_orphaned
from caldera.engine.processor import PreparedImage, prepare_image

logger = logging.getLogger(__name__)

# Added to the workers' nice value: the engine's steps and the event loop come first, image
# work takes what CPU is left (a quarter of a contended core at +5).
WORKER_NICENESS = 5

# Bytes hashed on the event loop; larger images are hashed in a thread (hashlib lets go of the
# interpreter lock), so a 20 MB upload does not hold up the streams for 15 ms.
_HASH_INLINE_BYTES = 1 << 20

DEFAULT_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class PoolResult:
    """A prepared image and what its two stages took, in seconds (0 when it came ``cached``)."""

    image: PreparedImage
    decode_seconds: float
    preprocess_seconds: float
    cached: bool = False


class ImagePool:
    """``await pool.prepare(data, base_only)``: encoded image bytes -> PreparedImage.

    ``workers`` processes; 0 runs the same work in threads of this process instead.
    ``cache_bytes``: room for prepared images (their pixel values), 0 for no cache."""

    def __init__(self, config: ImageProcessorConfig, workers: int, max_pixels: int,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        if workers < 0:
            raise ValueError(f"image workers must be >= 0, got {workers}")
        self.config = config
        self.workers = workers
        self.max_pixels = max_pixels
        self._processor = ImageProcessor(config) if workers == 0 else None
        self._executor = self._start() if workers else None
        self._cache = PreparedImageCache(cache_bytes)
        self._pending: dict[tuple[bytes, bool], asyncio.Future[PoolResult]] = {}

    def _start(self) -> concurrent.futures.ProcessPoolExecutor:
        executor = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(self.config, self.max_pixels))
        for _ in range(self.workers):  # spawn them now, not on the first image
            executor.submit(_ready)
        return executor

    async def prepare(self, data: bytes, base_only: bool) -> PoolResult:
        if not self._cache.capacity:
            return await self._prepare(data, base_only)
        digest = (hashlib.sha256(data).digest() if len(data) <= _HASH_INLINE_BYTES
                  else await asyncio.to_thread(lambda: hashlib.sha256(data).digest()))
        key = (digest, base_only)
        image = self._cache.get(key)
        if image is not None:
            return PoolResult(image, 0.0, 0.0, cached=True)
        pending = self._pending.get(key)
        if pending is not None:  # the same image is being prepared for another request
            result = await asyncio.shield(pending)
            return dataclasses.replace(result, decode_seconds=0.0, preprocess_seconds=0.0,
                                       cached=True)
        # A task of its own: a client that leaves does not cancel others' wait for the image.
        task = asyncio.ensure_future(self._prepare(data, base_only))
        self._pending[key] = task
        task.add_done_callback(lambda t: self._settle(key, t))
        return await asyncio.shield(task)

    def _settle(self, key: tuple[bytes, bool], task: asyncio.Future[PoolResult]) -> None:
        self._pending.pop(key, None)
        if not task.cancelled() and task.exception() is None:
            self._cache.put(key, task.result().image)

    async def _prepare(self, data: bytes, base_only: bool) -> PoolResult:
        executor = self._executor
        if executor is None:
            return await asyncio.to_thread(_timed_prepare, self._processor, data, base_only,
                                           self.max_pixels)
        for attempt in (1, 2):  # a pool broken before (or while) holding this image: retry once
            try:
                future = executor.submit(_prepare, data, base_only)
                pixels, image_size, used_base_only, identifier, decode_s, preprocess_s = \
                    await asyncio.wrap_future(future)
                break
            except BrokenProcessPool:
                executor = self._restart(executor)
                if attempt == 2:
                    raise MediaError("the image could not be decoded: its decoder process "
                                     "died (out of memory?); send a smaller or simpler "
                                     "image") from None
        processed = ProcessedImage(torch.from_numpy(pixels), image_size, used_base_only)
        return PoolResult(PreparedImage(processed, identifier), decode_s, preprocess_s)

    def _restart(self, broken: concurrent.futures.ProcessPoolExecutor
                 ) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is broken:  # the first request to see it restarts it
            logger.error("an image worker process died; starting new ones")
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
        return self._executor

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class PreparedImageCache:
    """Prepared images by key, least recently used out first, within ``capacity`` bytes of
    pixel values. The tensors are shared by every request that gets them: read-only."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"the image cache size must be >= 0, got {capacity}")
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[tuple[bytes, bool], PreparedImage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[bytes, bool]) -> PreparedImage | None:
        image = self._entries.get(key)
        if image is not None:
            self._entries.move_to_end(key)
        return image

    def put(self, key: tuple[bytes, bool], image: PreparedImage) -> None:
        nbytes = _nbytes(image)
        if nbytes > self.capacity or key in self._entries:
            return
        while self.size + nbytes > self.capacity:
            _, dropped = self._entries.popitem(last=False)
            self.size -= _nbytes(dropped)
        self._entries[key] = image
        self.size += nbytes


def _nbytes(image: PreparedImage) -> int:
    pixels = image.processed.pixel_values
    return pixels.numel() * pixels.element_size()


# ---- in the worker processes ----------------------------------------------------------------

_processor: ImageProcessor | None = None
_max_pixels = 0


def _init_worker(config: ImageProcessorConfig, max_pixels: int) -> None:
    global _processor, _max_pixels
    exit_when_orphaned()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle
    with contextlib.suppress(OSError):  # not allowed here: same priority then
        os.nice(WORKER_NICENESS)
    torch.set_num_threads(1)
    _processor = ImageProcessor(config)
    _max_pixels = max_pixels


def _ready() -> None:
    pass


def _prepare(data: bytes, base_only: bool
             ) -> tuple[np.ndarray, tuple[int, int], bool, str, float, float]:
    """Plain values back: a numpy array pickles by value (a tensor would go through shared
    memory, which containers often keep small)."""
    assert _processor is not None
    result = _timed_prepare(_processor, data, base_only, _max_pixels)
    processed = result.image.processed
    return (processed.pixel_values.numpy(), processed.image_size, processed.base_only,
            result.image.identifier, result.decode_seconds, result.preprocess_seconds)


def _timed_prepare(processor: ImageProcessor, data: bytes, base_only: bool,
                   max_pixels: int) -> PoolResult:
    start = time.perf_counter()
    image = decode_image(data, max_pixels=max_pixels)
    decoded = time.perf_counter()
    prepared = prepare_image(processor, image, base_only)
    return PoolResult(prepared, decoded - start, time.perf_counter() - decoded)
