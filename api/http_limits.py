"""uvicorn's HTTP protocols with a bound on headers and errors in the OpenAI shape.

httptools, uvicorn's fast parser, bounds neither the request line nor the headers: a client can
send megabytes of them, all buffered and handed to the app. The protocol here counts them as
they are parsed and answers 431 past ``MAX_HEADER_BYTES``, before any app code runs. h11 has its
own bound (``h11_max_incomplete_event_size``, set to the same number by the launcher). Bytes that
are not HTTP, which uvicorn answers with a plain-text 400, get an OpenAI error body here.
"""

from __future__ import annotations

import importlib.util
from http import HTTPStatus

from caldera.api.errors import APIError

# The request line and all header lines together. Browsers and SDKs send a few kilobytes;
# nginx's default is 32 KiB, Node's 16 KiB.
MAX_HEADER_BYTES = 64 * 1024


def raw_error_response(status: int, message: str, code: str) -> bytes:
    """A whole HTTP/1.1 error response that closes the connection."""
    body = APIError(status, message, code=code).encode()
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            "content-type: application/json\r\n"
            f"content-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode("ascii") + body


_INVALID = raw_error_response(400, "the request is not valid HTTP/1.1", "invalid_http")
_TOO_LARGE = raw_error_response(
    431, f"the request line and headers are over the limit of {MAX_HEADER_BYTES} bytes; send "
         "fewer or shorter headers", "headers_too_large")


def protocol_class() -> type:
    """The HTTP protocol class for uvicorn.Config(http=...): httptools when installed."""
    if importlib.util.find_spec("httptools") is not None:
        return _httptools_protocol()
    return _h11_protocol()


def _httptools_protocol() -> type:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        _header_bytes = 0
        _too_large = False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._header_bytes = 0

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            self._header_bytes += size
            if self._header_bytes > MAX_HEADER_BYTES:
                self._too_large = True
                # The parser stops and data_received answers through send_400_response.
                raise ValueError("headers over the limit")

        def send_400_response(self, msg: str) -> None:
            self.transport.write(_TOO_LARGE if self._too_large else _INVALID)
            self.transport.close()

    return LimitedHttpToolsProtocol


def _h11_protocol() -> type:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class OpenAIErrorsH11Protocol(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            self.transport.write(_INVALID)
            self.transport.close()

    return OpenAIErrorsH11Protocol
