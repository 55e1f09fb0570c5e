"""The built-in chat page: static files shipped in the package, served by the API's own app.

``/`` is the page; its assets are under ``/ui/``. They are plain files (HTML, CSS, ES modules,
no build step) and open to everyone: the page itself asks for the API key when the API answers
401, and sends it on API calls only. Routes are explicit (no catch-all mount at ``/``), so they
never shadow an API route whatever the order of registration.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"
UI_PREFIX = "/ui"

# Fixed here rather than taken from the mimetypes module, whose answer for .js depends on the
# host (/etc/mime.types, the Windows registry); browsers refuse ES modules served as text/plain.
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}
# The page loads nothing from elsewhere; images may come from anywhere the user points at.
_CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data: blob: http: https:; connect-src 'self' http: https:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate, so an upgraded package's page is picked up
    "X-Content-Type-Options": "nosniff",
}


def mount_ui(app: FastAPI, static_dir: Path = STATIC_DIR) -> None:
    """Serve the chat page at ``/`` and its assets at ``/ui/{path}`` (GET and HEAD)."""
    root = static_dir.resolve()
    index = root / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"the web page is missing from the package: no {index}")

    def page() -> FileResponse:
        headers = {**_HEADERS, "Content-Security-Policy": _CONTENT_SECURITY_POLICY}
        return FileResponse(index, media_type=_MEDIA_TYPES[".html"], headers=headers)

    def asset(path: str) -> FileResponse:
        file = (root / path).resolve()
        media_type = _MEDIA_TYPES.get(file.suffix)
        if media_type is None or not file.is_relative_to(root) or not file.is_file():
            raise HTTPException(status_code=404, detail=f"no such file: {UI_PREFIX}/{path}")
        return FileResponse(file, media_type=media_type, headers=_HEADERS)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(
        f"{UI_PREFIX}/{{path:path}}", asset, methods=["GET", "HEAD"], include_in_schema=False
    )
