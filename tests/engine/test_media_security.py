"""What a public server needs from image fetching: private addresses refused (and re-checked
on every redirect), the connection pinned to the checked address, and every limit holding
against a hostile server. All traffic stays on loopback: a real HTTP server on an ephemeral
port plays both the image host and the attacker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import socket
import ssl
import struct
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
import pytest

from caldera.engine import media
from caldera.engine.addresses import private_address_kind
from caldera.engine.media import (
    MediaError,
    MediaLimits,
    MediaTooLargeError,
    load_image,
    load_image_async,
)

IMAGE = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 32, 3), np.uint8))


def _encode_png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _same_pixels(a: PIL.Image.Image, b: PIL.Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


PNG = _encode_png(IMAGE)


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` and holds no pixels: a bomb's header only."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + (
        chunk(b"IEND", b"")
    )


HUGE_HEADER = _png_header(100_000, 100_000)  # past Pillow's own bomb limit
OVER_LIMIT = _png_header(8_000, 8_000)  # under Pillow's, over the default 50 MP


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.seen.append((self.path, self.headers.get("Host")))
        path, _, query = self.path.partition("?")
        if path == "/to":  # redirect to the URL in ?url=
            return self._redirect(urllib.parse.parse_qs(query)["url"][0])
        if path.startswith("/chain/"):  # /chain/N: N redirects, then the image
            left = int(path.rsplit("/", 1)[1])
            return self._redirect(f"/chain/{left - 1}") if left else self._send(PNG)
        routes = {
            "/image.png": lambda: self._send(PNG),
            "/drip": self._drip,
            "/longer-than-declared": lambda: self._send(PNG + b"\0" * 5000, length=len(PNG)),
            "/shorter-than-declared": lambda: self._send(PNG[:100], length=5000),
            "/declared-huge": lambda: self._send(PNG, length=10**9),
            "/big": lambda: self._send(b"\0" * 5000, length=None),
            "/huge-header.png": lambda: self._send(HUGE_HEADER),
            "/over-limit.png": lambda: self._send(OVER_LIMIT),
            "/gzip": lambda: self._send(zlib.compress(PNG), headers={"Content-Encoding": "gzip"}),
        }
        routes.get(path, lambda: self._send(b"", status=404))()

    def _send(self, body: bytes, *, status: int = 200, length: int | None = -1,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        if length is not None:
            self.send_header("Content-Length", str(len(body) if length == -1 else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        with contextlib.suppress(OSError):  # the client stopped reading, as it should
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self._send(b"", status=302, headers={"Location": location})

    def _drip(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            for _ in range(60):  # a byte every 50 ms for 3 s: no single read ever waits long
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.05)

    def log_message(self, *args) -> None:
        pass


def _serve(httpd: ThreadingHTTPServer):
    httpd.daemon_threads = True
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd


@pytest.fixture(scope="module")
def httpd():
    server = _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Handler))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def server(httpd) -> str:
    httpd.seen.clear()
    return f"http://127.0.0.1:{httpd.server_address[1]}"


def _refused(match: str, source, error: type[Exception] = MediaError, **kwargs) -> None:
    """Refused alike by the blocking and the event-loop forms."""
    with pytest.raises(error, match=match):
        load_image(source, **kwargs)
    with pytest.raises(error, match=match):
        asyncio.run(load_image_async(source, **kwargs))


def _loaded(source, *args, **kwargs) -> None:
    assert _same_pixels(load_image(source, *args, **kwargs), IMAGE)
    assert _same_pixels(asyncio.run(load_image_async(source, *args, **kwargs)), IMAGE)


# --- the address classifier -----------------------------------------------------------------


@pytest.mark.parametrize(("address", "kind"), [
    ("8.8.8.8", None),
    ("1.1.1.1", None),
    ("172.15.255.255", None),
    ("172.32.0.0", None),
    ("100.63.255.255", None),
    ("100.128.0.0", None),
    ("2606:4700:4700::1111", None),
    ("2001:4860:4860::8888", None),
    ("::ffff:8.8.8.8", None),
    ("64:ff9b::808:808", None),
    ("2002:808:808::1", None),
    ("127.0.0.1", "loopback"),
    ("127.255.255.254", "loopback"),
    ("10.1.2.3", "private"),
    ("172.16.0.1", "private"),
    ("172.31.255.255", "private"),
    ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"),
    ("100.64.0.1", "carrier-grade NAT"),
    ("100.127.255.255", "carrier-grade NAT"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
    ("239.255.255.250", "multicast"),
    ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"),
    ("192.0.2.1", "documentation"),
    ("198.18.0.1", "benchmarking"),
    ("::1", "loopback"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fe80::1%eth0", "link-local"),
    ("fc00::1", "private"),
    ("fd00:ec2::254", "private"),
    ("fec0::1", "site-local"),
    ("ff02::1", "multicast"),
    ("2001:db8::1", "documentation"),
    ("2001::1", "reserved"),  # Teredo
    ("::7f00:1", "reserved"),  # IPv4-compatible, deprecated
    ("64:ff9b:1::1", "private"),
    ("::ffff:127.0.0.1", "loopback (IPv4 127.0.0.1 inside an IPv4-mapped IPv6 address)"),
    ("::ffff:169.254.169.254",
     "link-local (IPv4 169.254.169.254 inside an IPv4-mapped IPv6 address)"),
    ("::ffff:10.0.0.1", "private (IPv4 10.0.0.1 inside an IPv4-mapped IPv6 address)"),
    ("2002:7f00:1::", "loopback (IPv4 127.0.0.1 inside a 6to4 IPv6 address)"),
    ("2002:a9fe:a9fe::1", "link-local (IPv4 169.254.169.254 inside a 6to4 IPv6 address)"),
    ("64:ff9b::7f00:1", "loopback (IPv4 127.0.0.1 inside a NAT64 IPv6 address)"),
    ("64:ff9b::a9fe:a9fe", "link-local (IPv4 169.254.169.254 inside a NAT64 IPv6 address)"),
])
def test_address_classifier(address: str, kind: str | None):
    assert private_address_kind(address) == kind


# --- private addresses ----------------------------------------------------------------------


def test_loopback_is_refused_by_default_and_allowed_on_request(server, httpd):
    _refused(
        r"is not allowed: its host 127\.0\.0\.1 is a loopback address.*"
        r"--allow-private-media-urls", f"{server}/image.png",
    )
    assert httpd.seen == []  # refused before connecting
    _loaded(f"{server}/image.png", allow_private=True)
    _loaded(f"{server}/image.png", MediaLimits(allow_private=True))


def test_a_name_that_resolves_to_loopback_is_refused(httpd):
    url = f"http://localhost:{httpd.server_address[1]}/image.png"
    _refused(r"its host localhost resolves to [0-9a-f:.]+, a loopback address", url)
    _refused("loopback address", f"http://[::1]:{httpd.server_address[1]}/image.png")
    _refused("loopback address", f"http://2130706433:{httpd.server_address[1]}/image.png")
    _loaded(url, allow_private=True)  # an address where nothing listens (::1) is skipped


def test_redirects_are_checked_at_every_hop(server, httpd, monkeypatch):
    def to(url: str) -> str:
        return f"{server}/to?url={urllib.parse.quote(url, safe='')}"

    _refused("redirects to file:///etc/passwd, which is not an http\\(s\\) URL",
             to("file:///etc/passwd"), allow_private=True)
    _refused("which is not an http\\(s\\) URL", to("ftp://example.com/cat.png"),
             allow_private=True)
    _loaded(to(f"{server}/image.png"), allow_private=True)
    # Play a public host: 127.0.0.1 counts as public, so only the redirect is refused.
    monkeypatch.setattr(media, "private_address_kind",
                        lambda a: None if a == "127.0.0.1" else private_address_kind(a))
    _loaded(to(f"{server}/image.png"))
    metadata = "http://169.254.169.254/latest/meta-data/"
    _refused("169.254.169.254 is a link-local address.*--allow-private-media-urls",
             to(metadata), timeout=1.0)
    _refused("is a private address", to("http://[fd00:ec2::254]/"), timeout=1.0)
    _refused("loopback", to(f"http://127.0.0.2:{httpd.server_address[1]}/image.png"))
    _refused("IPv4-mapped", to(f"http://[::ffff:7f00:2]:{httpd.server_address[1]}/"))


def test_at_most_five_redirects(server):
    _loaded(f"{server}/chain/5", allow_private=True)
    _refused("redirects more than 5 times", f"{server}/chain/6", allow_private=True)


# --- DNS rebinding --------------------------------------------------------------------------


class _RebindingResolver:
    """Answers ``images.test`` with 127.0.0.1 once, then with a private address: a client
    that resolves the name again to connect goes where the check never looked."""

    def __init__(self, real) -> None:
        self.real, self.asked = real, 0

    def answer(self, host, port, *args, **kwargs):
        if host != "images.test":
            return self.real(host, port, *args, **kwargs)
        self.asked += 1
        address = "127.0.0.1" if self.asked == 1 else "10.255.255.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]


@pytest.fixture
def rebinding(monkeypatch) -> _RebindingResolver:
    monkeypatch.setattr(media, "private_address_kind",
                        lambda a: None if a == "127.0.0.1" else private_address_kind(a))
    resolver = _RebindingResolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", resolver.answer)
    return resolver


async def _load_with_loop_resolver(resolver: _RebindingResolver, source: str, **kwargs):
    loop = asyncio.get_running_loop()

    async def answer(host, port, *args, **kw):
        return resolver.answer(host, port, *args, **kw)

    loop.getaddrinfo = answer  # the loop is this test's own
    return await load_image_async(source, **kwargs)


def test_the_connection_goes_to_the_checked_address(httpd, rebinding):
    port = httpd.server_address[1]
    url = f"http://images.test:{port}/image.png"
    assert _same_pixels(load_image(url, timeout=1.0), IMAGE)
    assert rebinding.asked == 1
    rebinding.asked = 0
    loaded = asyncio.run(_load_with_loop_resolver(rebinding, url, timeout=1.0))
    assert _same_pixels(loaded, IMAGE) and rebinding.asked == 1
    assert httpd.seen[-2:] == [("/image.png", f"images.test:{port}")] * 2


def test_tls_names_the_host_not_the_address(rebinding):
    """The certificate is for images.test only (no IP in it): verification passes only if
    the TLS server name is the URL's host while the socket goes to 127.0.0.1."""
    server_context, client_context = _tls_contexts("images.test")
    names: list[str | None] = []
    server_context.sni_callback = lambda sock, name, ctx: names.append(name)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    _serve(httpd)
    try:
        url = f"https://images.test:{httpd.server_address[1]}/image.png"
        with media.httpx.Client(verify=client_context) as client:
            assert _same_pixels(load_image(url, timeout=2.0, client=client), IMAGE)
        rebinding.asked = 0

        async def fetch():
            async with media.httpx.AsyncClient(verify=client_context) as client:
                return await _load_with_loop_resolver(rebinding, url, timeout=2.0, client=client)

        assert _same_pixels(asyncio.run(fetch()), IMAGE)
        assert names == ["images.test"] * 2
    finally:
        httpd.shutdown()
        httpd.server_close()


def _tls_contexts(hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for ``hostname``, and a client
    context that trusts exactly that certificate."""
    pytest.importorskip("cryptography")
    import datetime
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = f"{folder}/cert.pem", f"{folder}/key.pem"
        with open(cert_file, "wb") as f:
            f.write(cert_pem)
        with open(key_file, "wb") as f:
            f.write(key_pem)
        server_context.load_cert_chain(cert_file, key_file)
    client_context = ssl.create_default_context(cadata=cert_pem.decode())
    return server_context, client_context


# --- hostile servers ------------------------------------------------------------------------


def test_a_slow_drip_is_cut_off_at_the_timeout(server):
    # Each byte comes well within any read timeout; only the whole-fetch limit stops it
    # (had it not, the 60 bytes would end as "not a valid image").
    _refused("timed out after 0.5 s", f"{server}/drip", timeout=0.5, allow_private=True)


def test_a_lying_content_length(server):
    # Longer than declared: the bytes past the declared length are never read.
    _loaded(f"{server}/longer-than-declared", allow_private=True, max_bytes=len(PNG) + 100)
    _refused(r"could not fetch image URL.*received 100 bytes, expected 5000",
             f"{server}/shorter-than-declared", allow_private=True)
    _refused("larger than the limit of 1000000 bytes", f"{server}/declared-huge",
             MediaTooLargeError, allow_private=True, max_bytes=10**6)


def test_oversize_bodies_and_bombs_are_too_large(server):
    _refused("larger than the limit of 1000 bytes", f"{server}/big", MediaTooLargeError,
             allow_private=True, max_bytes=1000)
    _refused("larger than the limit of 1000 bytes", b"\0" * 5000, MediaTooLargeError,
             max_bytes=1000)
    # Too large from the header alone: decoding the empty pixel data would fail otherwise.
    _refused("more than the limit of 50000000 pixels", f"{server}/huge-header.png",
             MediaTooLargeError, allow_private=True)
    _refused("8000x8000 = 64000000 pixels, over the limit of 50000000",
             f"{server}/over-limit.png", MediaTooLargeError, allow_private=True)
    _refused("over the limit of 100 pixels", PNG, MediaTooLargeError, max_pixels=100)
    assert len(HUGE_HEADER) < 100
    assert not issubclass(MediaError, MediaTooLargeError)
    with pytest.raises(MediaError) as caught:
        load_image(f"{server}/image.png", allow_private=True, max_bytes=10)
    assert isinstance(caught.value, MediaTooLargeError)


def test_a_compressed_body_is_refused(server):
    _refused("Content-Encoding 'gzip'", f"{server}/gzip", allow_private=True)


# --- MediaLimits ----------------------------------------------------------------------------


def test_media_limits(tmp_path):
    limits = MediaLimits(max_bytes=10, allowed_local_paths=[str(tmp_path)])
    assert limits.allowed_local_paths == (str(tmp_path),)
    assert MediaLimits(allowed_local_paths=tmp_path).allowed_local_paths == (str(tmp_path),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_bytes = 20
    (tmp_path / "cat.png").write_bytes(PNG)
    with pytest.raises(MediaTooLargeError, match="limit of 10 bytes"):
        load_image(str(tmp_path / "cat.png"), limits)
    # A keyword overrides the object's field.
    assert _same_pixels(load_image(str(tmp_path / "cat.png"), limits, max_bytes=10**6), IMAGE)
    for bad in ({"max_bytes": 0}, {"max_pixels": 0}, {"timeout": 0}):
        with pytest.raises(ValueError):
            MediaLimits(**bad)
