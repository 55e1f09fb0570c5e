"""What the robustness tests (tests/robustness) share: a hostile image host on loopback, the
launcher that counts its address as public, error-shape checks, the server's open files and
threads, and waiting for it to be idle."""

from __future__ import annotations

import contextlib
import http.server
import sys
import threading
import time
import urllib.parse
import zlib
from pathlib import Path

import httpx
from server_support import OpenAISchemas, ServerProcess, descendants, png_bytes
from support import make_image

# A loopback address the hostile image host listens on; serve_public_loopback.py makes the
# server count it, and only it, as public.
PUBLIC_ADDRESS = "127.0.0.3"
PUBLIC_LAUNCHER = [sys.executable,
                   str(Path(__file__).parent / "robustness" / "serve_public_loopback.py"),
                   PUBLIC_ADDRESS]


class ImageHost:
    """An HTTP server of images that misbehaves on request. Routes:

    /ok.png            a PNG                     /chain/N       N redirects, then the PNG
    /to?url=U          302 to U                  /drip          a byte every 50 ms, for 20 s
    /says-less.png     Content-Length < body     /says-more.png Content-Length > body, closes
    /says-huge.png     Content-Length 1e9        /endless       no length, bytes until closed
    /gzip.png          gzip-encoded PNG          /page.html     an HTML page
    /missing.png       404
    """

    def __init__(self, address: str = PUBLIC_ADDRESS) -> None:
        self.png = png_bytes(make_image(60, 80, seed=5))
        self.hits: list[str] = []
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                host.hits.append(self.path)
                host.route(self)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{address}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, h: http.server.BaseHTTPRequestHandler) -> None:
        path, _, query = h.path.partition("?")
        png = self.png
        if path == "/to":
            return _send(h, b"", 302, headers={"Location": urllib.parse.parse_qs(query)["url"][0]})
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            if left:
                return _send(h, b"", 302, headers={"Location": f"/chain/{left - 1}"})
            return _send(h, png)
        if path == "/drip":
            return _drip(h)
        if path == "/endless":
            return _endless(h)
        routes = {
            "/ok.png": lambda: _send(h, png),
            "/says-less.png": lambda: _send(h, png + b"\0" * 4096, length=len(png) // 2),
            "/says-more.png": lambda: _send(h, png[:100], length=len(png)),
            "/says-huge.png": lambda: _send(h, png, length=10**9),
            "/gzip.png": lambda: _send(h, zlib.compress(png), headers={"Content-Encoding": "gzip"}),
            "/page.html": lambda: _send(h, b"<html><body>not an image</body></html>",
                                        headers={"Content-Type": "text/html"}),
        }
        routes.get(path, lambda: _send(h, b"not found", 404))()


def _send(h, body: bytes, status: int = 200, *, length: int | None = None,
          headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Length", str(len(body) if length is None else length))
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    with contextlib.suppress(OSError):  # the server stopped reading, as it should
        h.wfile.write(body)
    h.close_connection = True


def _drip(h) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(400):  # no single read waits long; only a deadline on the whole stops it
            h.wfile.write(b"\0")
            h.wfile.flush()
            time.sleep(0.05)


def _endless(h) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()
    with contextlib.suppress(OSError):
        for _ in range(10_000):
            h.wfile.write(b"\0" * 65536)


def check_error(response: httpx.Response, status: int, schemas: OpenAISchemas) -> dict:
    """``response`` is ``status`` with an OpenAI error body; returns the error object."""
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    schemas.validate(body, "ErrorResponse")
    assert body["error"]["message"]
    return body["error"]


def resources(server: ServerProcess) -> tuple[int, int]:
    """Open file descriptors and threads of the server and its engine process, together."""
    fds = threads = 0
    for pid in [server.proc.pid, *descendants(server.proc.pid)]:
        with contextlib.suppress(FileNotFoundError):
            fds += len(list(Path(f"/proc/{pid}/fd").iterdir()))
            threads += len(list(Path(f"/proc/{pid}/task").iterdir()))
    return fds, threads


def metrics_once(server: ServerProcess) -> dict[str, float]:
    """/metrics over a connection closed at once (it adds no descriptor to count)."""
    from server_support import read_metrics

    with httpx.Client(base_url=server.base_url, headers={**server.headers,
                                                         "Connection": "close"}) as c:
        return read_metrics(c)


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """Polls /metrics until nothing runs, waits or holds a KV block; returns the last read."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics_once(server)
        idle = (m["caldera_num_requests_running"] == 0 and m["caldera_num_requests_waiting"] == 0
                and m["caldera_kv_cache_usage_perc"] == 0
                and m["caldera_num_requests_in_flight"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)
