"""Errors a client can cause, as values with an HTTP status, mapped once to the OpenAI error
shape: ``{"error": {"message", "type", "param", "code"}}`` (``code`` a string or null)."""

from __future__ import annotations

from http import HTTPStatus

import msgspec

from caldera.api.protocol import ErrorInfo, ErrorResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """Raised anywhere in a request's handling; the app turns it into a response."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> ErrorResponse:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else
                          "invalid_request_error")
        return ErrorResponse(ErrorInfo(self.message, kind, self.param, self.code))

    def encode(self) -> bytes:
        return msgspec.json.encode(self.body())


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, param=param, code=code)


def from_decode_error(exc: msgspec.DecodeError) -> APIError:
    """msgspec's messages name the JSON path: 'Expected `int`, got `str` - at `$.n`'."""
    text = str(exc)
    param = None
    if " - at `$." in text:
        param = text.rsplit(" - at `$.", 1)[1].rstrip("`")
    if isinstance(exc, msgspec.ValidationError):
        return bad_request(f"invalid request body: {text}", param=param)
    return bad_request(f"the request body is not valid JSON: {text}", code="invalid_json")
