"""Loading user images: a PIL image, bytes, a ``data:image/...;base64,`` URL, raw base64, an
http(s) URL, a ``file://`` URL or a local path under an allowed directory.

Every limit is checked before the pixels are decoded: the byte size while downloading or
reading, the pixel count from the image header (PIL opens lazily), so a small file that
would decode to gigabytes (a decompression bomb) is refused cheaply. Anything wrong with what
the user sent raises ``MediaError`` (a ValueError) saying what to change; going over a size
or pixel limit raises its subclass ``MediaTooLargeError`` (the server answers it with 413).

http(s) URLs are fetched as a public server must (see ``_fetch_async``): hosts that are or
resolve to loopback, private, link-local and other non-public addresses are refused unless
``allow_private`` is set, redirects are followed here (at most ``MAX_REDIRECTS``) with each hop
checked again, and the connection goes to the very address that was checked. Private
addresses are refused by default in ``load_image`` as in ``load_image_async``: one function
must not be safe or unsafe depending on how it is called. The offline ``LLM`` opts in, as its
caller is the operator; the server only with ``--allow-private-media-urls``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import io
import ipaddress
import os
import re
import socket
import ssl
import stat
import time
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import httpx
import PIL.Image
import PIL.ImageOps

from caldera.engine.addresses import private_address_kind

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
# 50 megapixels decode to 150 MB of RGB: more than any phone photo (48 MP), well under
# Pillow's own decompression-bomb warning threshold (~89 MP).
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
ALLOW_PRIVATE_FLAG = "--allow-private-media-urls"

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


class MediaTooLargeError(MediaError):
    """An image over the byte or pixel limit (HTTP 413 at the server)."""


@dataclass(frozen=True, kw_only=True)
class MediaLimits:
    """What loading one user image may cost and reach; the server builds one from its flags.

    ``timeout`` bounds a whole http(s) fetch (name resolution, redirects, body) in seconds.
    ``allow_private`` lets URLs reach loopback, private and link-local addresses.
    ``allowed_local_paths`` are the directories local paths and ``file://`` URLs may name;
    with none, local files are refused.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    timeout: float = DEFAULT_TIMEOUT_S
    allow_private: bool = False
    allowed_local_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError("media max_bytes and max_pixels must be at least 1")
        if not self.timeout > 0:
            raise ValueError(f"media timeout must be a positive number of seconds, got {self.timeout}")
        paths = self.allowed_local_paths
        if isinstance(paths, (str, os.PathLike)):
            paths = (paths,)
        object.__setattr__(self, "allowed_local_paths", tuple(os.fspath(p) for p in paths))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def load_image(
    source: ImageSource,
    limits: MediaLimits | None = None,
    *,
    allowed_local_paths: Sequence[str] | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    timeout: float | None = None,
    allow_private: bool | None = None,
    client: httpx.Client | None = None,
) -> PIL.Image.Image:
    """Fetch or read ``source`` and decode it (EXIF orientation applied, mode untouched).

    Limits come from ``limits`` (default ``MediaLimits()``); a keyword given here overrides
    that field. A PIL image is returned as is. Local paths (plain or ``file://``) must
    resolve, symlinks followed, inside one of the allowed directories. ``client`` lets a
    caller reuse one HTTP connection pool; it must connect directly, not through a proxy.
    """
    if isinstance(source, PIL.Image.Image):
        return source
    limits = _merged(limits, allowed_local_paths, max_bytes, max_pixels, timeout, allow_private)
    url = _http_url(source)
    if url is not None:
        data = _fetch(url, limits, client)
    else:
        data = _read_local_source(source, limits.allowed_local_paths, limits.max_bytes)
    return decode_image(data, max_pixels=limits.max_pixels)


async def load_image_async(
    source: ImageSource,
    limits: MediaLimits | None = None,
    *,
    allowed_local_paths: Sequence[str] | None = None,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    timeout: float | None = None,
    allow_private: bool | None = None,
    client: httpx.AsyncClient | None = None,
) -> PIL.Image.Image:
    """``load_image`` for the event loop: URLs are fetched with httpx.AsyncClient (names
    resolved with the loop's getaddrinfo), and reading files, base64 decoding and image
    decoding run in a worker thread."""
    if isinstance(source, PIL.Image.Image):
        return source
    limits = _merged(limits, allowed_local_paths, max_bytes, max_pixels, timeout, allow_private)
    data = await read_image_async(source, limits, client)
    return await asyncio.to_thread(decode_image, data, max_pixels=limits.max_pixels)


async def read_image_async(
    source: str | bytes | bytearray | memoryview | os.PathLike,
    limits: MediaLimits,
    client: httpx.AsyncClient | None = None,
) -> bytes:
    """The encoded bytes of an image source, undecoded: an http(s) URL fetched on the event
    loop, a ``data:`` URL, raw base64, raw bytes or an allowed local path read in a thread."""
    url = _http_url(source)
    if url is None:
        return await asyncio.to_thread(
            _read_local_source, source, limits.allowed_local_paths, limits.max_bytes
        )
    return await _fetch_async(url, limits, client)


def _merged(
    limits: MediaLimits | None,
    allowed_local_paths: Sequence[str] | None,
    max_bytes: int | None,
    max_pixels: int | None,
    timeout: float | None,
    allow_private: bool | None,
) -> MediaLimits:
    """``limits`` (or the defaults) with the keywords given to the call put in."""
    given = {
        "allowed_local_paths": allowed_local_paths, "max_bytes": max_bytes,
        "max_pixels": max_pixels, "timeout": timeout, "allow_private": allow_private,
    }
    changes = {name: value for name, value in given.items() if value is not None}
    base = limits if limits is not None else MediaLimits()
    return dataclasses.replace(base, **changes) if changes else base


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> PIL.Image.Image:
    """Decode encoded image bytes, refusing more than ``max_pixels`` before decoding."""
    if not data:
        raise MediaError("image data is empty")
    try:
        image = PIL.Image.open(io.BytesIO(data), formats=_available_formats())
    except PIL.Image.DecompressionBombError:  # Pillow's own limit, met before ours
        raise MediaTooLargeError(
            f"image has more than the limit of {max_pixels} pixels; send a smaller image"
        ) from None
    except Exception:  # any parser failure on untrusted bytes is the sender's problem, not a 500
        raise MediaError(f"image data is not a valid {_FORMAT_NAMES} image") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise MediaTooLargeError(
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
        raise MediaTooLargeError(
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


def _fetch(source: str, limits: MediaLimits, client: httpx.Client | None) -> bytes:
    """``_fetch_async`` for a blocking caller: the same checks, the whole-fetch ``timeout``
    kept by a deadline checked per request and per chunk (name resolution, done by the
    system's blocking resolver, cannot be cut short)."""
    deadline = time.monotonic() + limits.timeout
    owned = client is None
    http = client if client is not None else httpx.Client(verify=_tls(), trust_env=False)
    try:
        url = _hop_url(source, None)
        for _ in range(MAX_REDIRECTS + 1):
            addresses = _checked_addresses(url, _getaddrinfo(url), limits.allow_private)
            redirect, data = _get(http, url, addresses, limits.max_bytes, deadline)
            if redirect is None:
                return data
            url = redirect
        raise _too_many_redirects(source)
    except httpx.TimeoutException:
        raise _timed_out(source, limits.timeout) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MediaError(f"could not fetch image URL {_shorten(source)}: {exc}") from None
    finally:
        if owned:
            http.close()


def _get(
    http: httpx.Client, url: httpx.URL, addresses: tuple[str, ...], max_bytes: int,
    deadline: float,
) -> tuple[httpx.URL | None, bytes]:
    for address in addresses[:-1]:  # the next checked address when one does not answer
        with contextlib.suppress(httpx.ConnectError):
            return _get_from(http, url, address, max_bytes, deadline)
    return _get_from(http, url, addresses[-1], max_bytes, deadline)


def _get_from(
    http: httpx.Client, url: httpx.URL, address: str, max_bytes: int, deadline: float
) -> tuple[httpx.URL | None, bytes]:
    """One GET of ``url`` at ``address``: (redirect target, b"") or (None, body)."""
    target, headers, extensions = _pinned(url, address)
    with http.stream(
        "GET", target, headers=headers, extensions=extensions,
        timeout=_time_left(deadline), follow_redirects=False,
    ) as response:
        location = _check_response(response, url, max_bytes)
        if location is not None:
            return _hop_url(location, url), b""
        body = _Body(url, max_bytes)
        for chunk in response.iter_raw():
            body.add(chunk)
            _time_left(deadline)
        return None, body.data()


async def _fetch_async(source: str, limits: MediaLimits, client: httpx.AsyncClient | None) -> bytes:
    """GET an image URL as a public server must.

    Each hop (the user's URL, then every redirect target, at most ``MAX_REDIRECTS``):

        URL -- http(s)? --> getaddrinfo(host) -- every address public? --> GET http(s)://ADDRESS/path
                                                                           Host: host
                                                                           TLS SNI + cert: host

    The request names the checked address instead of the host, so the HTTP client never
    resolves the name a second time: a DNS server that answers the check with a public
    address and the connection with 127.0.0.1 (DNS rebinding) gains nothing. The Host header
    and the TLS server name (``sni_hostname``, which httpcore uses for SNI and for checking
    the certificate) stay the URL's host, so the remote server and TLS see an ordinary
    request. Addresses are tried in getaddrinfo's order when one does not connect.

    ``timeout`` bounds the whole fetch, a server dripping bytes included; the body is read
    raw (``Accept-Encoding: identity``, a compressed body refused) and cut at ``max_bytes``
    whatever its Content-Length says. A client the caller passes must connect directly (a
    proxy would resolve the name itself); its pool reuses connections by address, so a TLS
    connection verified for one name may carry a later request for another name that
    resolved to the same checked address. Without one, a private pool serves one fetch.
    """
    owned = client is None
    http = client if client is not None else httpx.AsyncClient(verify=_tls(), trust_env=False)
    try:
        return await asyncio.wait_for(_follow_async(http, source, limits), limits.timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise _timed_out(source, limits.timeout) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise MediaError(f"could not fetch image URL {_shorten(source)}: {exc}") from None
    finally:
        if owned:
            await http.aclose()


async def _follow_async(http: httpx.AsyncClient, source: str, limits: MediaLimits) -> bytes:
    url = _hop_url(source, None)
    loop = asyncio.get_running_loop()
    for _ in range(MAX_REDIRECTS + 1):
        try:
            infos = await loop.getaddrinfo(
                url.raw_host.decode("ascii"), _port(url), type=socket.SOCK_STREAM
            )
        except OSError as exc:
            raise _unresolved(url, exc) from None
        addresses = _checked_addresses(url, infos, limits.allow_private)
        redirect, data = await _get_async(http, url, addresses, limits)
        if redirect is None:
            return data
        url = redirect
    raise _too_many_redirects(source)


async def _get_async(
    http: httpx.AsyncClient, url: httpx.URL, addresses: tuple[str, ...], limits: MediaLimits
) -> tuple[httpx.URL | None, bytes]:
    for address in addresses[:-1]:  # the next checked address when one does not answer
        with contextlib.suppress(httpx.ConnectError):
            return await _get_from_async(http, url, address, limits)
    return await _get_from_async(http, url, addresses[-1], limits)


async def _get_from_async(
    http: httpx.AsyncClient, url: httpx.URL, address: str, limits: MediaLimits
) -> tuple[httpx.URL | None, bytes]:
    """One GET of ``url`` at ``address``: (redirect target, b"") or (None, body)."""
    target, headers, extensions = _pinned(url, address)
    async with http.stream(
        "GET", target, headers=headers, extensions=extensions,
        timeout=limits.timeout, follow_redirects=False,
    ) as response:
        location = _check_response(response, url, limits.max_bytes)
        if location is not None:
            return _hop_url(location, url), b""
        body = _Body(url, limits.max_bytes)
        async for chunk in response.aiter_raw():
            body.add(chunk)
        return None, body.data()


# ---- pieces shared by both -----------------------------------------------------------------


@cache
def _tls() -> ssl.SSLContext:
    """The default verifying TLS context, built once: loading the CA bundle takes tens of
    milliseconds, too long to repeat on the event loop for every fetch."""
    return httpx.create_ssl_context()


def _hop_url(text: str, previous: httpx.URL | None) -> httpx.URL:
    """The user's URL (``previous`` None) or a redirect's Location, resolved and checked."""
    try:
        url = httpx.URL(text.strip()) if previous is None else previous.join(text.strip())
    except httpx.InvalidURL as exc:
        raise MediaError(f"could not fetch image URL {_shorten(text)}: {exc}") from None
    if url.scheme not in ("http", "https"):
        raise MediaError(
            f"image URL {_shorten(str(previous))} redirects to {_shorten(text.strip())}, which is "
            "not an http(s) URL; only http(s) redirects are followed"
        )
    if not url.raw_host:
        raise MediaError(f"could not fetch image URL {_shorten(text)}: it names no host")
    return url


def _port(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _getaddrinfo(url: httpx.URL) -> list:
    try:
        return socket.getaddrinfo(url.raw_host.decode("ascii"), _port(url), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise _unresolved(url, exc) from None


def _checked_addresses(url: httpx.URL, infos: list, allow_private: bool) -> tuple[str, ...]:
    """The resolved addresses, in order, once every one of them is allowed."""
    families = (socket.AF_INET, socket.AF_INET6)
    addresses = tuple(dict.fromkeys(str(i[4][0]) for i in infos if i[0] in families))
    if not addresses:
        raise MediaError(f"could not fetch image URL {_shorten(str(url))}: no IP address found")
    for address in () if allow_private else addresses:
        kind = private_address_kind(address)
        if kind is None:
            continue
        host = url.host
        subject = f"is {_an_address(kind)}" if _same_ip(address, host) else (
            f"resolves to {address}, {_an_address(kind)}"
        )
        raise MediaError(
            f"image URL {_shorten(str(url))} is not allowed: its host {host} {subject}; "
            "loopback, private and link-local addresses are refused unless the server is "
            f"started with {ALLOW_PRIVATE_FLAG} (allow_private=True in Python)"
        )
    return addresses


def _same_ip(address: str, host: str) -> bool:
    try:
        return ipaddress.ip_address(address) == ipaddress.ip_address(host)
    except ValueError:  # host is a name
        return False


def _an_address(kind: str) -> str:
    """"loopback (IPv4 ... inside ...)" -> "a loopback address (IPv4 ... inside ...)"."""
    name, paren, detail = kind.partition(" (")
    article = "an" if name[0] in "aeiou" else "a"
    return f"{article} {name} address" + (f" ({detail}" if paren else "")


def _pinned(url: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, str]]:
    """The request for ``url`` sent to the checked ``address``: URL, headers, extensions."""
    headers = {
        "Host": url.netloc.decode("ascii"),
        "Accept": "image/*",
        "Accept-Encoding": "identity",  # a small compressed body must not inflate past the cap
    }
    return url.copy_with(host=address), headers, {"sni_hostname": url.raw_host.decode("ascii")}


def _check_response(response: httpx.Response, url: httpx.URL, max_bytes: int) -> str | None:
    """A redirect's Location, or None for a body to read (refused here if it is too large)."""
    shown, status = _shorten(str(url)), response.status_code
    if status in (301, 302, 303, 307, 308):
        location = response.headers.get("location")
        if not location:
            raise MediaError(f"image URL {shown} returned HTTP {status} without a Location")
        return location
    if not 200 <= status < 300:
        raise MediaError(f"image URL {shown} returned HTTP {status}")
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaError(
            f"image URL {shown} was sent with Content-Encoding {encoding!r}; serve the image "
            "file itself, uncompressed"
        )
    length = response.headers.get("content-length", "").strip()
    if length.isdigit():
        _check_size(int(length), max_bytes, f"image at {shown}")
    return None


class _Body:
    """Chunks of a response body, refused as soon as they pass ``max_bytes``."""

    def __init__(self, url: httpx.URL, max_bytes: int) -> None:
        self.what, self.max_bytes = f"image at {_shorten(str(url))}", max_bytes
        self.chunks: list[bytes] = []
        self.received = 0

    def add(self, chunk: bytes) -> None:
        self.received += len(chunk)
        _check_size(self.received, self.max_bytes, self.what)
        self.chunks.append(chunk)

    def data(self) -> bytes:
        return b"".join(self.chunks)


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpx.ReadTimeout("the fetch deadline passed")
    return left


def _unresolved(url: httpx.URL, exc: OSError) -> MediaError:
    reason = exc.strerror or str(exc)
    return MediaError(
        f"could not fetch image URL {_shorten(str(url))}: cannot resolve host {url.host!r} "
        f"({reason})"
    )


def _timed_out(source: str, timeout: float) -> MediaError:
    return MediaError(f"fetching image URL {_shorten(source)} timed out after {timeout:g} s")


def _too_many_redirects(source: str) -> MediaError:
    return MediaError(
        f"image URL {_shorten(source)} redirects more than {MAX_REDIRECTS} times; link to the "
        "image itself"
    )
