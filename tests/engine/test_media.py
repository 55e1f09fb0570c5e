"""Image loading from every source, the limits checked before decoding, and the errors a
user sees. http(s) sources are served by a real local HTTP server on an ephemeral port."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
import pytest

from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig
from caldera.engine.media import (
    MediaError,
    decode_image,
    load_image,
    load_image_async,
)
from caldera.engine.processor import prepare_image


def _encode(image: PIL.Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


RNG = np.random.default_rng(0)
IMAGE = PIL.Image.fromarray(RNG.integers(0, 256, (24, 32, 3), dtype=np.uint8))
PNG = _encode(IMAGE)
JPEG = _encode(IMAGE, "JPEG", quality=95)
# One-bit pixels compress to almost nothing: decompression bombs in miniature.
BOMB = _encode(PIL.Image.new("1", (20_000, 20_000)))
LARGE = _encode(PIL.Image.new("1", (5_000, 5_000)))


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        routes = {
            "/image.png": lambda: self._send(200, PNG),
            "/image.jpg": lambda: self._send(200, JPEG),
            "/missing.png": lambda: self._send(404, b"not found"),
            "/large": lambda: self._send(200, b"\0" * 5000),
            "/large-unsized": lambda: self._send(200, b"\0" * 5000, sized=False),
            "/slow": self._slow,
            "/redirect": self._redirect,
            "/text": lambda: self._send(200, b"<html>hello</html>"),
        }
        routes.get(self.path, lambda: self._send(404, b""))()

    def _send(self, status: int, body: bytes, sized: bool = True) -> None:
        self.send_response(status)
        if sized:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _slow(self) -> None:
        self.send_response(200)
        self.end_headers()
        for _ in range(30):  # a trickle that never trips a per-read timeout
            self.wfile.write(b"\0")
            self.wfile.flush()
            time.sleep(0.05)

    def _redirect(self) -> None:
        self.send_response(302)
        self.send_header("Location", "/image.png")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _same_pixels(a: PIL.Image.Image, b: PIL.Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# --- sources --------------------------------------------------------------------------------


def test_pil_image_is_returned_as_is():
    assert load_image(IMAGE) is IMAGE


def test_bytes_data_url_and_raw_base64():
    assert _same_pixels(load_image(PNG), IMAGE)
    encoded = base64.b64encode(PNG).decode()
    assert _same_pixels(load_image(f"data:image/png;base64,{encoded}"), IMAGE)
    assert _same_pixels(load_image(encoded), IMAGE)
    # JPEG base64 starts with "/9j/", which looks like an absolute path.
    jpeg_b64 = base64.b64encode(JPEG).decode()
    assert jpeg_b64.startswith("/9j/")
    assert load_image(jpeg_b64).size == (32, 24)
    url_safe_unpadded = base64.urlsafe_b64encode(JPEG).decode().rstrip("=")
    assert load_image(url_safe_unpadded).format == "JPEG"
    wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    assert _same_pixels(load_image(f"data:image/png;base64,{wrapped}"), IMAGE)


def test_http_url_sync_and_async(server):
    # The test server is on loopback, which only an operator's opt-in reaches.
    assert _same_pixels(load_image(f"{server}/image.png", allow_private=True), IMAGE)
    assert _same_pixels(load_image(f"{server}/redirect", allow_private=True), IMAGE)
    loaded = asyncio.run(load_image_async(f"{server}/image.jpg", allow_private=True))
    assert loaded.format == "JPEG" and loaded.size == (32, 24)


def test_local_paths_and_file_urls(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "cat.png").write_bytes(PNG)
    roots = [str(allowed)]
    assert _same_pixels(load_image(str(allowed / "cat.png"), allowed_local_paths=roots), IMAGE)
    assert _same_pixels(load_image(allowed / "cat.png", allowed_local_paths=roots), IMAGE)
    file_url = (allowed / "cat.png").as_uri()
    assert _same_pixels(load_image(file_url, allowed_local_paths=roots), IMAGE)
    via_thread = asyncio.run(load_image_async(file_url, allowed_local_paths=roots))
    assert _same_pixels(via_thread, IMAGE)


def test_exif_orientation_is_applied():
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = load_image(_encode(IMAGE, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (24, 32)


def test_modes_are_kept():
    for mode in ("RGBA", "L", "LA", "P", "I;16", "1"):
        assert load_image(_encode(IMAGE.convert(mode))).mode == mode


# --- refusals -------------------------------------------------------------------------------


def _refused(match: str, source, **kwargs) -> None:
    with pytest.raises(MediaError, match=match):
        load_image(source, **kwargs)


def test_local_paths_outside_allowed_directories_are_refused(tmp_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.png").write_bytes(PNG)
    (allowed / "link.png").symlink_to(outside / "secret.png")
    roots = [str(allowed)]
    _refused(
        "disabled; start the server with --allowed-local-media-path", str(outside / "secret.png")
    )
    _refused(
        "outside the allowed directories", str(outside / "secret.png"), allowed_local_paths=roots
    )
    _refused(
        "outside the allowed directories", str(allowed / "link.png"), allowed_local_paths=roots
    )
    traversal = f"{allowed}/../outside/secret.png"
    _refused("outside the allowed directories", traversal, allowed_local_paths=roots)
    _refused("does not exist", str(allowed / "nope.png"), allowed_local_paths=roots)
    _refused("not a regular file", str(allowed), allowed_local_paths=roots)
    os.mkfifo(allowed / "fifo")
    _refused("not a regular file", str(allowed / "fifo"), allowed_local_paths=roots)


def test_byte_limits_are_enforced_before_decoding(server, tmp_path):
    small = len(PNG) - 1
    _refused("larger than the limit", PNG, max_bytes=small)
    _refused("larger than the limit", base64.b64encode(PNG).decode(), max_bytes=small)
    (tmp_path / "cat.png").write_bytes(PNG)
    _refused(
        "larger than the limit",
        str(tmp_path / "cat.png"),
        allowed_local_paths=[str(tmp_path)],
        max_bytes=small,
    )
    _refused("larger than the limit", f"{server}/large", max_bytes=1000, allow_private=True)
    _refused(
        "larger than the limit", f"{server}/large-unsized", max_bytes=1000, allow_private=True
    )
    with pytest.raises(MediaError, match="larger than the limit"):
        asyncio.run(
            load_image_async(f"{server}/large-unsized", max_bytes=1000, allow_private=True)
        )


def test_pixel_limit_refuses_decompression_bombs_before_decoding():
    assert len(BOMB) < 100_000 and len(LARGE) < 10_000
    start = time.perf_counter()
    _refused("more than the limit of 50000000 pixels", BOMB)
    _refused(r"5000x5000 = 25000000 pixels, over the limit of 1000000", LARGE, max_pixels=10**6)
    _refused("over the limit of 100 pixels", PNG, max_pixels=100)
    assert time.perf_counter() - start < 1.0  # nothing was decoded


def test_http_errors(server):
    _refused("returned HTTP 404", f"{server}/missing.png", allow_private=True)
    _refused("timed out after 0.5 s", f"{server}/slow", timeout=0.5, allow_private=True)
    with pytest.raises(MediaError, match="timed out"):
        asyncio.run(load_image_async(f"{server}/slow", timeout=0.5, allow_private=True))
    with pytest.raises(MediaError, match="returned HTTP 404"):
        asyncio.run(load_image_async(f"{server}/missing.png", allow_private=True))
    _refused("not a valid", f"{server}/text", allow_private=True)
    _refused("could not fetch image URL", "http://127.0.0.1:1/image.png", allow_private=True)
    _refused("could not fetch image URL", "http://")
    with pytest.raises(MediaError, match="could not fetch image URL"):
        asyncio.run(load_image_async("https://[::1"))


def test_bad_data_is_a_media_error():
    _refused("not a valid", b"definitely not an image")
    _refused("not a valid", PNG[:40] + b"garbage" * 10)
    _refused("truncated or corrupt", PNG[: len(PNG) // 2])
    _refused("empty", b"")
    _refused("media type must be image", "data:text/plain;base64,aGVsbG8=")
    _refused("not valid base64", "data:image/png;base64,@@@@")
    _refused("scheme 'ftp' is not supported", "ftp://example.com/cat.png")
    _refused("not an http\\(s\\) URL", "hello there")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    _refused("not a valid", eps)  # Ghostscript-backed formats are never opened
    for cut in (len(JPEG) // 3, len(JPEG) - 40):
        with pytest.raises(MediaError):
            decode_image(JPEG[:cut])


# --- content hash ---------------------------------------------------------------------------

PROCESSOR = ImageProcessor(ImageProcessorConfig(do_center_crop=False))


def image_content_hash(image: PIL.Image.Image) -> str:
    return prepare_image(PROCESSOR, image, base_only=False).identifier


def test_content_hash_depends_on_pixels_only(tmp_path):
    (tmp_path / "cat.png").write_bytes(PNG)
    from_file = load_image(str(tmp_path / "cat.png"), allowed_local_paths=[str(tmp_path)])
    from_base64 = load_image(base64.b64encode(PNG).decode())
    expected = image_content_hash(IMAGE)
    assert image_content_hash(from_file) == expected == image_content_hash(from_base64)
    assert len(expected) == 64 and int(expected, 16) >= 0
    changed = IMAGE.copy()
    changed.putpixel((16, 12), (1, 2, 3) if IMAGE.getpixel((16, 12)) != (1, 2, 3) else (4, 5, 6))
    assert image_content_hash(changed) != expected
    # What the vision tower sees decides: an opaque alpha channel changes nothing.
    assert image_content_hash(IMAGE.convert("RGBA")) == expected
    assert image_content_hash(PIL.Image.open(io.BytesIO(JPEG))) != expected


def test_content_hash_sees_palette_and_transparency():
    indexed = IMAGE.quantize(8)
    recoloured = indexed.copy()
    recoloured.putpalette([255 - v for v in indexed.getpalette()])
    assert image_content_hash(indexed) != image_content_hash(recoloured)
    transparent = indexed.copy()
    transparent.info["transparency"] = 0
    assert image_content_hash(indexed) != image_content_hash(transparent)
