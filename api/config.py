"""ServerConfig: the HTTP side's options (the engine's are EngineConfig), frozen, parsed once
by the CLI."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from caldera.engine.image_pool import DEFAULT_CACHE_BYTES
from caldera.engine.media import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_TIMEOUT_S


def default_image_workers() -> int:
    """One image process per four cores, at least one, at most four."""
    return min(4, max(1, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # The first name is the one responses carry; "default" is always accepted too.
    served_model_names: tuple[str, ...] = ("default",)
    api_key: str | None = None
    allowed_local_media_paths: tuple[str, ...] = ()
    allow_private_media_urls: bool = False
    limit_images_per_prompt: int = 8
    # Requests waiting beyond the engine's max_num_seqs running ones; None: no limit.
    max_queued_requests: int | None = None
    media_fetch_timeout: float = DEFAULT_TIMEOUT_S
    max_image_bytes: int = DEFAULT_MAX_BYTES
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    allowed_origins: tuple[str, ...] = ()
    ui: bool = True
    # Processes that decode and preprocess images (0: threads of the API process instead).
    image_workers: int = dataclasses.field(default_factory=default_image_workers)
    # Room for prepared images sent again (pixel values, bytes); 0: every image is decoded.
    image_cache_bytes: int = DEFAULT_CACHE_BYTES

    def __post_init__(self) -> None:
        if not self.served_model_names:
            raise ValueError("give at least one --served-model-name")
        if self.limit_images_per_prompt < 0:
            raise ValueError("--limit-images-per-prompt must be >= 0")
        if self.max_queued_requests is not None and self.max_queued_requests < 0:
            raise ValueError("--max-queued-requests must be >= 0")
        if self.media_fetch_timeout <= 0 or self.max_image_bytes <= 0 \
                or self.max_image_pixels <= 0:
            raise ValueError("--media-fetch-timeout, --max-image-bytes and --max-image-pixels "
                             "must be positive")
        if self.image_workers < 0:
            raise ValueError("--image-workers must be >= 0")
        if self.image_cache_bytes < 0:
            raise ValueError("--image-cache must be >= 0")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: every image as base64 at the byte limit, plus text."""
        return max(self.limit_images_per_prompt, 1) * (self.max_image_bytes * 4 // 3 + 1024) \
            + 8 * 1024 * 1024
