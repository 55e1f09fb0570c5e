"""Loading user images: a PIL image, bytes, a ``data:image/...;base64,`` URL, raw base64, an
http(s) URL, a ``file://`` URL or a local path under an allowed directory.

Every limit is checked before the pixels are decoded: the byte size while downloading or
reading, the pixel count from the image header (PIL opens lazily), so a small file that
would decode to gigabytes (a decompression bomb) is refused cheaply. Anything wrong with what
the user sent raises ``MediaError`` (a ValueError) saying what to change.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import io
import os
import re
import stat
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import httpx
import PIL.Image
import PIL.ImageOps

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# 50 megapixels decode to 150 MB of RGB: more than any phone photo (48 MP), well under
# Pillow's own decompression-bomb warning threshold (~89 MP).
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TIMEOUT_S = 10.0

# Raster formats a chat client sends. Pillow can open many more (EPS, for one, runs
# Ghostscript), which untrusted input should not reach.
_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF or AVIF"
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_BASE64_TEXT = re.compile(r"^[A-Za-z0-9+/=_-]+$")
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_MAX_PATH_CHARS = 4096

ImageSource = PIL.Image.Image | bytes | bytearray | memoryview | str | os.PathLike


class MediaError(ValueError):
    """An image a user sent cannot be used; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    *,
    allowed_local_paths: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
) -> PIL.Image.Image:
    """Fetch or read ``source`` and decode it (EXIF orientation applied, mode untouched).

    A PIL image is returned as is. Local paths (plain or ``file://``) must resolve, symlinks
    followed, inside one of ``allowed_local_paths``; with none given they are refused.
    ``client`` lets a caller reuse one HTTP connection pool.
    """
    if isinstance(source, PIL.Image.Image):
        return source
    url = _http_url(source)
    if url is not None:
        data = _fetch(url, max_bytes=max_bytes, timeout=timeout, client=client)
    else:
        data = _read_local_source(source, allowed_local_paths, max_bytes)
    return decode_image(data, max_pixels=max_pixels)


async def load_image_async(
    source: ImageSource,
    *,
    allowed_local_paths: Sequence[str] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    timeout: float = DEFAULT_TIMEOUT_S,
    client: httpx.AsyncClient | None = None,
) -> PIL.Image.Image:
    """``load_image`` for the event loop: URLs are fetched with httpx.AsyncClient, and
    reading files, base64 decoding and image decoding run in a worker thread."""
    if isinstance(source, PIL.Image.Image):
        return source
    url = _http_url(source)
    if url is None:
        data = await asyncio.to_thread(_read_local_source, source, allowed_local_paths, max_bytes)
    else:
        data = await _fetch_async(url, max_bytes=max_bytes, timeout=timeout, client=client)
    return await asyncio.to_thread(decode_image, data, max_pixels=max_pixels)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode encoded image bytes, refusing more than ``max_pixels`` before decoding."""
    if not data:
        raise MediaError("image data is empty")
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=_available_formats())
    except PIL.Image.DecompressionBombError:  # Pillow's own limit, met before ours
        raise MediaError(
            f"image has more than the limit of {max_pixels} pixels; send a smaller image"
        ) from None
    except Exception:  # any parser failure on untrusted bytes is the sender's problem, not a 500
        raise MediaError(f"image data is not a valid {_FORMAT_NAMES} image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise MediaError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels; send a smaller image"
        )
    try:
        image.load()
    except Exception:
        raise MediaError(f"{image.format} image data is truncated or corrupt") from None
    with contextlib.suppress(Exception):  # a broken EXIF block loses the orientation only
        PIL.ImageOps.exif_transpose(image, in_place=True)
    return image


def image_content_hash(image: PIL.Image.Image) -> str:
    """sha256 hex of what preprocessing sees: mode, size, palette, transparency and pixels.

    Identical pixels give the identical hash whatever the source (URL, base64, file), so the
    prefix cache and the encoder cache can share work between requests.
    """
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    if image.mode in ("P", "PA"):  # pixels are palette indices: the palette is content too
        digest.update(bytes(image.getpalette(rawmode=None) or ()))
    transparency = image.info.get("transparency")
    if transparency is not None:  # changes the RGB conversion (composited onto white)
        digest.update(b"transparency:" + repr(transparency).encode())
    digest.update(b"pixels:")
    digest.update(image.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Sources other than http(s)
# --------------------------------------------------------------------------------------------


def _http_url(source: ImageSource) -> str | None:
    if isinstance(source, str):
        text = source.strip()
        if text[:8].lower().startswith(("http://", "https://")):
            return text
    return None


def _read_local_source(
    source: ImageSource, allowed_local_paths: Sequence[str], max_bytes: int
) -> bytes:
    """Bytes of every source but an http(s) URL."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), max_bytes, "image data")
        return data
    if isinstance(source, os.PathLike):
        return _read_path(os.fspath(source), allowed_local_paths, max_bytes)
    if not isinstance(source, str):
        raise MediaError(f"unsupported image source of type {type(source).__name__}")
    text = source.strip()
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        return _decode_data_url(text, max_bytes)
    if lowered.startswith("file:"):
        return _read_path(_file_url_path(text), allowed_local_paths, max_bytes)
    if _URL_SCHEME.match(text):
        scheme = text.split(":", 1)[0]
        raise MediaError(
            f"image URL scheme {scheme!r} is not supported; use http(s), data: or base64"
        )
    if _is_base64_image(text):
        return _decode_base64(text, max_bytes, "base64 image data")
    return _read_path(text, allowed_local_paths, max_bytes)


def _is_base64_image(text: str) -> bool:
    """Raw base64 or a path? Base64 wins when it decodes to an image header (JPEG base64
    starts with '/9j/', which also looks like a path), or when no path is that long."""
    compact = "".join(text.split())
    if not compact or not _BASE64_TEXT.match(compact):
        return False
    if len(text) > _MAX_PATH_CHARS:
        return True
    try:
        head = base64.b64decode(_pad(compact[:64]), altchars=_altchars(compact))
    except (binascii.Error, ValueError):
        return False
    return head.startswith(_IMAGE_MAGIC) or head[4:8] == b"ftyp"


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("data URL has no ',' before its data; expected data:image/png;base64,...")
    params = [p.strip().lower() for p in header.split(";")]
    if params[0] and not params[0].startswith("image/"):
        raise MediaError(f"data URL media type must be image/*, got {params[0]!r}")
    if "base64" in params[1:]:
        return _decode_base64(payload, max_bytes, "data URL")
    data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), max_bytes, "data URL")
    return data


def _decode_base64(text: str, max_bytes: int, what: str) -> bytes:
    compact = "".join(text.split())
    # Refuse by the encoded length first, so an oversized payload is never decoded.
    _check_size(len(compact) * 3 // 4, max_bytes, what)
    try:
        return base64.b64decode(_pad(compact), altchars=_altchars(compact), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{what} is not valid base64") from None


def _pad(text: str) -> str:
    return text + "=" * (-len(text) % 4)  # clients often drop the padding


def _altchars(text: str) -> bytes | None:
    return b"-_" if ("-" in text or "_" in text) else None  # URL-safe alphabet


def _file_url_path(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaError(f"file URL host {parts.netloc!r} is not supported; use file:///path")
    return urllib.request.url2pathname(parts.path)


def _read_path(path: str, allowed_local_paths: Sequence[str], max_bytes: int) -> bytes:
    """Read a local file that resolves (symlinks followed) inside an allowed directory."""
    shown = _shorten(path)
    if not allowed_local_paths:
        raise MediaError(
            f"image {shown!r} is not an http(s) URL, a data: URL or base64 image data, and "
            "local image paths are disabled; start the server with "
            "--allowed-local-media-path DIR to serve images from DIR"
        )
    if len(path) > _MAX_PATH_CHARS or "\x00" in path:
        raise MediaError(f"local image path {shown!r} is not a valid path")
    resolved = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(root)) for root in allowed_local_paths]
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        raise MediaError(
            f"local image path {shown} is outside the allowed directories; start the server "
            "with --allowed-local-media-path set to a directory that contains it"
        )
    return _read_regular_file(resolved, shown, max_bytes)


def _read_regular_file(resolved: Path, shown: str, max_bytes: int) -> bytes:
    # O_NOFOLLOW: the checked path must not turn into a symlink before we open it;
    # O_NONBLOCK: opening a FIFO must not hang the server.
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        raise MediaError(f"local image file {shown} does not exist") from None
    except OSError as exc:
        raise MediaError(f"cannot open local image file {shown}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"local image path {shown} is not a regular file")
        _check_size(info.st_size, max_bytes, f"local image file {shown}")
        with open(fd, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)  # the file may have grown since fstat
    finally:
        os.close(fd)
    _check_size(len(data), max_bytes, f"local image file {shown}")
    return data


def _check_size(size: int, max_bytes: int, what: str) -> None:
    if size > max_bytes:
        raise MediaError(
            f"{what} is larger than the limit of {max_bytes} bytes; send a smaller image"
        )


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@cache
def _available_formats() -> tuple[str, ...]:
    PIL.Image.init()  # registers every plugin; asking Image.open for an unknown one raises
    return tuple(name for name in _FORMATS if name in PIL.Image.OPEN)


# --------------------------------------------------------------------------------------------
# http(s)
# --------------------------------------------------------------------------------------------


def _fetch(url: str, *, max_bytes: int, timeout: float, client: httpx.Client | None) -> bytes:
    """GET ``url``, refusing bodies over ``max_bytes`` while streaming and taking at most
    ``timeout`` seconds in all (httpx's own timeouts are per read, not per download)."""
    deadline = time.monotonic() + timeout
    owned = client is None
    http = client if client is not None else httpx.Client()
    try:
        with http.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            _check_response(response, url, max_bytes)
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                _check_size(received, max_bytes, f"image at {_shorten(url)}")
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("download deadline passed")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.TimeoutException:
        raise MediaError(
            f"fetching image URL {_shorten(url)} timed out after {timeout:g} s"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MediaError(f"could not fetch image URL {_shorten(url)}: {exc}") from None
    finally:
        if owned:
            http.close()


async def _fetch_async(
    url: str, *, max_bytes: int, timeout: float, client: httpx.AsyncClient | None
) -> bytes:
    """``_fetch`` on httpx.AsyncClient, with the same limits."""
    owned = client is None
    http = client if client is not None else httpx.AsyncClient()
    try:
        return await asyncio.wait_for(_stream_async(http, url, max_bytes, timeout), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise MediaError(
            f"fetching image URL {_shorten(url)} timed out after {timeout:g} s"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MediaError(f"could not fetch image URL {_shorten(url)}: {exc}") from None
    finally:
        if owned:
            await http.aclose()


async def _stream_async(http: httpx.AsyncClient, url: str, max_bytes: int, timeout: float) -> bytes:
    async with http.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
        _check_response(response, url, max_bytes)
        chunks: list[bytes] = []
        received = 0
        async for chunk in response.aiter_bytes():
            received += len(chunk)
            _check_size(received, max_bytes, f"image at {_shorten(url)}")
            chunks.append(chunk)
        return b"".join(chunks)


def _check_response(response: httpx.Response, url: str, max_bytes: int) -> None:
    if response.status_code >= 400:
        raise MediaError(f"image URL {_shorten(url)} returned HTTP {response.status_code}")
    length = response.headers.get("content-length", "")
    if length.isdigit():
        _check_size(int(length), max_bytes, f"image at {_shorten(url)}")
