"""Helpers for tests that drive the real server: start ``caldera serve`` on a free loopback
port as a subprocess, stop it and check nothing is left, a loopback image server, the OpenAI
schemas as a validator, and the Prometheus text parsed."""

from __future__ import annotations

import contextlib
import copy
import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import referencing
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

SCHEMA_FILE = Path(__file__).parent / "api" / "openai_schema" / "openai-chat-schemas.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Live descendant pids of ``pid`` (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class ServerProcess:
    def __init__(self, args: list[str], api_key: str | None = None,
                 env: dict[str, str] | None = None, startup_timeout: float = 240.0,
                 launcher: list[str] | None = None) -> None:
        """``launcher``: the command that stands for ``caldera`` (default: the installed
        entry point)."""
        self.port = free_port()
        self.api_key = api_key
        self.base_url = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("caldera", path=str(Path(sys.executable).parent)) or "caldera"
        cmd = [*(launcher or [exe]), "serve", "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = io.StringIO()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_ready(startup_timeout)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"the server did not become healthy: {self.output()}")

    def output(self) -> str:
        return self.log.getvalue()[-6000:]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stops the server; returns its exit code. Asserts no child process is left."""
        children = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"the server did not stop: {self.output()}") from None
        code = self.proc.returncode
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in children):
            time.sleep(0.1)
        left = [p for p in children if alive(p)]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left running after the server stopped: {left}"
        return code


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# ---- images ---------------------------------------------------------------------------------


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def image_server(files: dict[str, bytes]) -> Iterator[str]:
    """A loopback HTTP server of ``files`` (path -> bytes); yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---- OpenAI schemas -------------------------------------------------------------------------


def _nullable_to_null(node):
    """OpenAPI 3.0 ``nullable: true`` -> JSON Schema "or null"."""
    if isinstance(node, dict):
        node = {k: _nullable_to_null(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "$ref" in node or "anyOf" in node or "oneOf" in node or "type" not in node:
                return {"anyOf": [node, {"type": "null"}]}
            kind = node["type"]
            node["type"] = [*kind, "null"] if isinstance(kind, list) else [kind, "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        return node
    if isinstance(node, list):
        return [_nullable_to_null(v) for v in node]
    return node


class OpenAISchemas:
    def __init__(self) -> None:
        document = _nullable_to_null(json.loads(SCHEMA_FILE.read_text()))
        self.document = document
        resource = referencing.Resource.from_contents(
            document, default_specification=referencing.jsonschema.DRAFT202012)
        self.registry = referencing.Registry().with_resource("urn:openai", resource)

    def validate(self, instance: dict, name: str) -> None:
        schema = copy.deepcopy(self.document["components"]["schemas"][name])
        schema = {"$ref": f"urn:openai#/components/schemas/{name}"}
        jsonschema.Draft202012Validator(schema, registry=self.registry).validate(instance)


# ---- metrics --------------------------------------------------------------------------------


def read_metrics(client: httpx.Client) -> dict[str, float]:
    """``{"name{label=value,...}": value}`` and ``{"name": value}`` (summed over labels) from
    /metrics, parsed with prometheus_client's parser."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())
                              if k != "model_name")
            key = f"{sample.name}{{{labels}}}" if labels else sample.name
            values[key] = values.get(key, 0.0) + sample.value
            if labels:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def sse_events(response: httpx.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, in order."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
