"""Hostile clients against one real server: 60+ malformed, oversized or abusive requests (each
its 4xx in the OpenAI error shape, never a 500), then 300 streams of which a third hang up at
random points. The server runs without --allow-private-media-urls; its image host on
127.0.0.3 plays a public host (see serve_public_loopback.py)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import random
import socket
import struct
import time
import zlib
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from robustness_support import PUBLIC_LAUNCHER, check_error, resources, wait_idle
from server_support import ServerProcess, png_bytes
from support import make_image

MAX_IMAGES = 3
MAX_IMAGE_BYTES = 2 * 2**20
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    make_image(40, 60, seed=1).save(allowed / "photo.png")
    make_image(40, 60, seed=2).save(outside / "secret.png")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    (allowed / "folder").mkdir()
    os.mkfifo(allowed / "pipe.png")
    return {"allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def server(next_mistral_dir, media, image_host):
    proc = ServerProcess([
        "--model", str(next_mistral_dir), "--served-model-name", "tiny",
        "--kv-cache-memory", "64MiB", "--max-model-len", str(MAX_MODEL_LEN),
        "--max-num-seqs", "32", "--allowed-local-media-path", str(media["allowed"]),
        "--limit-images-per-prompt", str(MAX_IMAGES), "--max-image-bytes", "2MiB",
        "--media-fetch-timeout", "1.5", "--no-ui",
    ], launcher=PUBLIC_LAUNCHER)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


# ---- the requests ----------------------------------------------------------------------------


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _bomb() -> bytes:
    """A real decompression bomb: 7200 x 7200 black pixels (52 MP) in about 50 kB."""
    return _png(7200, 7200, zlib.compress(bytes(7201) * 7200, 9))


def _gif_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("P", (2, 2)).save(buf, format="GIF")
    gif = bytearray(buf.getvalue())
    gif[6:10] = struct.pack("<HH", width, height)
    return bytes(gif)


def _message(*urls: str, text: str = "What is shown?", **extra) -> list[dict]:
    parts: list[dict] = [{"type": "image_url", "image_url": {"url": u, **extra}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def _chat(**fields) -> dict:
    return {"model": "tiny", "max_tokens": 2, **fields}


MSG = [{"role": "user", "content": "hi"}]


@dataclass
class Case:
    """One request: ``json``, ``content`` (raw bytes) or ``chunked_mib`` MiB of spaces sent
    chunked to ``path``, or raw HTTP bytes. The error message must contain ``says``."""

    status: int
    json: Any = None
    content: bytes | None = None
    path: str = "/v1/chat/completions"
    method: str = "POST"
    raw_http: bytes | None = None
    chunked_mib: int = 0
    says: str = ""


def _cases(media: dict, host: str, port: int) -> dict[str, Case]:
    allowed, outside = media["allowed"], media["outside"]
    image = png_bytes(make_image(30, 40, seed=4))
    ok = _data_url(image)

    def img(*urls: str, status: int = 400, says: str = "", **extra) -> Case:
        return Case(status, _chat(messages=_message(*urls, **extra)), says=says)

    private, local = "--allow-private-media-urls", "--allowed-local-media-path"

    def to(url: str) -> str:
        return f"{host}/to?url={url}"

    body = json.dumps(_chat(messages=MSG)).encode()
    request = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return {
        # -- bodies that are not a chat request
        "bad-json": Case(400, content=b"{not json"),
        "array-body": Case(400, content=b"[1, 2, 3]"),
        "string-body": Case(400, content=b'"hello"'),
        "null-body": Case(400, content=b"null"),
        "empty-body": Case(400, content=b""),
        "invalid-utf8": Case(400, content=b'{"messages": [{"role": "user", "content": "\xff"}]}'),
        "lone-surrogate": Case(400, content=b'{"messages":[{"role":"user","content":"\\ud800"}]}'),
        "nan-literal": Case(400, content=b'{"messages": [], "temperature": NaN}'),
        "deep-nesting": Case(400, content=b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        "missing-messages": Case(400, _chat()),
        "messages-a-string": Case(400, _chat(messages="hello")),
        "messages-empty": Case(400, _chat(messages=[])),
        "unknown-role": Case(400, _chat(messages=[{"role": "wizard", "content": "x"}])),
        "content-a-number": Case(400, _chat(messages=[{"role": "user", "content": 5}])),
        "part-without-type": Case(400, _chat(messages=[{"role": "user",
                                                        "content": [{"text": "x"}]}])),
        "audio-part": Case(400, _chat(messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}])),
        "model-a-number": Case(400, _chat(model=5, messages=MSG)),
        "unknown-model": Case(404, _chat(model="gpt-17", messages=MSG)),
        # -- parameters out of range, wrong types, huge values
        "n-wrong-type": Case(400, _chat(messages=MSG, n="two")),
        "n-zero": Case(400, _chat(messages=MSG, n=0)),
        "n-huge": Case(400, _chat(messages=MSG, n=10_000)),
        "max-tokens-zero": Case(400, _chat(messages=MSG, max_tokens=0)),
        "max-tokens-negative": Case(400, _chat(messages=MSG, max_tokens=-5)),
        "max-tokens-huge": Case(400, _chat(messages=MSG, max_tokens=10**9)),
        "max-tokens-past-int64": Case(400, _chat(messages=MSG, max_tokens=10**30)),
        "min-tokens-past-context": Case(400, _chat(messages=MSG, max_tokens=None,
                                                   min_tokens=10**9)),
        "temperature-negative": Case(400, _chat(messages=MSG, temperature=-1)),
        "temperature-a-string": Case(400, _chat(messages=MSG, temperature="hot")),
        "temperature-overflow": Case(400, content=b'{"messages": [], "temperature": 1e400}'),
        "top-p-two": Case(400, _chat(messages=MSG, top_p=2)),
        "top-k-negative": Case(400, _chat(messages=MSG, top_k=-5)),
        "top-logprobs-huge": Case(400, _chat(messages=MSG, logprobs=True, top_logprobs=10**6)),
        "presence-penalty": Case(400, _chat(messages=MSG, presence_penalty=5)),
        "seed-past-int64": Case(400, _chat(messages=MSG, seed=2**64)),
        "logit-bias-key": Case(400, _chat(messages=MSG, logit_bias={"abc": 1})),
        "logit-bias-token": Case(400, _chat(messages=MSG, logit_bias={"99999999": 1})),
        "logit-bias-value": Case(400, _chat(messages=MSG, logit_bias={"5": 1000})),
        "stop-too-many": Case(400, _chat(messages=MSG, stop=["a"] * 17)),
        "tools": Case(400, _chat(messages=MSG, tools=[{"type": "function"}])),
        "template-kwargs-messages": Case(400, _chat(messages=MSG, chat_template_kwargs={
            "messages": []})),
        "template-kwargs-generation-prompt": Case(400, _chat(messages=MSG, chat_template_kwargs={
            "add_generation_prompt": False})),
        "prompt-over-context": Case(400, _chat(messages=[{"role": "user",
                                                          "content": "x " * 20_000}])),
        "many-messages-over-context": Case(400, _chat(messages=MSG * 5_000)),
        # -- images that are not images, or too large
        "image-undecodable": img(_data_url(b"hello, I am not an image")),
        "image-truncated-png": img(_data_url(image[:200])),
        "image-truncated-jpeg": img(_data_url(_jpeg()[:300], "image/jpeg")),
        "image-bomb-header": Case(413, _chat(messages=_message(_data_url(_png(
            100_000, 100_000, zlib.compress(b"")))))),
        "image-bomb": img(_data_url(_bomb()), status=413),
        "image-gif-screen-bomb": img(_data_url(_gif_screen(65535, 65535), "image/gif"),
                                     status=413),
        "image-over-byte-limit": img(_data_url(os.urandom(MAX_IMAGE_BYTES + 4096)), status=413),
        "image-invalid-base64": img("data:image/png;base64,!!!!"),
        "image-raw-invalid-base64": img("iVBORw0KGgo$$$$"),
        "image-data-url-not-image": img(_data_url(b"text", "text/plain")),
        "image-data-url-no-comma": img("data:image/png;base64"),
        "image-empty-url": img(""),
        "image-url-a-number": Case(400, _chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": 5}}]}])),
        "image-detail-ultra": img(ok, detail="ultra"),
        "too-many-images": img(*[ok] * (MAX_IMAGES + 1)),
        "image-marker-mismatch": img(ok, text="<image> and <image>?"),
        "image-ftp-scheme": img("ftp://example.com/a.png"),
        # -- local files outside the allowed folder, or not files
        "path-outside": img(str(outside / "secret.png"), says=local),
        "path-dotdot": img(f"{allowed}/../outside/secret.png", says=local),
        "path-symlink-out": img(str(allowed / "link.png"), says=local),
        "path-missing": img(str(allowed / "nothing.png")),
        "path-directory": img(str(allowed / "folder")),
        "path-fifo": img(str(allowed / "pipe.png"), says="not a regular file"),
        "path-nul": img(f"{allowed}/photo.png\x00.png"),
        "file-url-etc-passwd": img("file:///etc/passwd"),
        "file-url-remote-host": img("file://fileserver/share/a.png"),
        # -- URLs to refused addresses: directly, by name and through a redirect
        "url-loopback": img(f"http://127.0.0.1:{port}/ok.png", says=private),
        "url-localhost": img(f"http://localhost:{port}/ok.png", says=private),
        "url-ipv6-loopback": img(f"http://[::1]:{port}/ok.png", says=private),
        "url-ipv4-mapped-loopback": img(f"http://[::ffff:127.0.0.1]:{port}/ok.png", says=private),
        "url-decimal-loopback": img(f"http://2130706433:{port}/ok.png", says=private),
        "url-unspecified": img(f"http://0.0.0.0:{port}/ok.png", says=private),
        "url-metadata": img("http://169.254.169.254/latest/meta-data/", says=private),
        "url-private": img("http://10.0.0.1/a.png", says=private),
        "url-ipv6-private": img("http://[fd00:ec2::254]/", says=private),
        "redirect-to-loopback": img(to(f"http://127.0.0.1:{port}/ok.png"), says=private),
        "redirect-to-localhost": img(to(f"http://localhost:{port}/ok.png"), says=private),
        "redirect-to-metadata": img(to("http://169.254.169.254/latest/meta-data/"), says=private),
        "redirect-to-file": img(to("file:///etc/passwd"), says="not an http(s) URL"),
        "redirect-chain-too-long": img(f"{host}/chain/6", says="redirects more than"),
        "url-unresolvable": img("http://no-such-host.invalid/a.png"),  # or a DNS time-out
        # -- image hosts that misbehave
        "url-slow-drip": img(f"{host}/drip", says="timed out"),
        "url-endless-body": img(f"{host}/endless", status=413),
        "url-length-says-less": img(f"{host}/says-less.png"),
        "url-length-says-more": img(f"{host}/says-more.png"),
        "url-length-says-huge": img(f"{host}/says-huge.png", status=413),
        "url-gzip": img(f"{host}/gzip.png"),
        "url-html-page": img(f"{host}/page.html"),
        "url-404": img(f"{host}/missing.png"),
        # -- the other routes
        "completions-token-out-of-vocab": Case(400, {"prompt": [1, 99_999_999]},
                                               path="/v1/completions"),
        "completions-empty-prompt": Case(400, {"prompt": []}, path="/v1/completions"),
        "completions-too-many-prompts": Case(400, {"prompt": ["a"] * 10_000, "max_tokens": 1},
                                             path="/v1/completions"),
        "completions-image-token": Case(400, {"prompt": [1, 32000, 5]}, path="/v1/completions"),
        "tokenize-nothing": Case(400, {}, path="/tokenize"),
        "detokenize-out-of-vocab": Case(400, {"tokens": [2**40]}, path="/detokenize"),
        "model-card-unknown": Case(404, method="GET", path="/v1/models/nope"),
        "no-such-route": Case(404, method="GET", path="/v1/nothing"),
        "wrong-method": Case(405, method="GET"),
        # -- HTTP itself
        "headers-10MB": Case(431, raw_http=request + b"".join(
            b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000) for i in range(10_000))
            + b"Content-Length: %d\r\n\r\n" % len(body) + body),
        "header-line-10MB": Case(431, raw_http=request + b"X-Big: " + b"a" * 10 * 2**20
                                 + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body),
        "content-length-huge": Case(413, raw_http=request
                                    + b"Content-Length: 1000000000000\r\n\r\n" + body),
        "content-length-negative": Case(400, raw_http=request + b"Content-Length: -5\r\n\r\n"),
        "not-http": Case(400, raw_http=b"HELLO THERE\r\n\r\n"),
        "body-over-limit-chunked": Case(413, chunked_mib=24),  # over 3 x 2 MiB + 8 MiB
    }


def _jpeg() -> bytes:
    buf = io.BytesIO()
    make_image(40, 60).save(buf, format="JPEG")
    return buf.getvalue()


def _raw_http(port: int, data: bytes) -> httpx.Response:
    """Sends ``data`` as is; parses the response (the server may close before reading it all)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        with contextlib.suppress(OSError):  # refused early: the answer is on its way
            s.sendall(data)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < _expected_length(received):
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def _expected_length(received: bytes) -> int:
    head, _, _ = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        if name.lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 0


def _send(server: ServerProcess, http: httpx.Client, case: Case) -> httpx.Response:
    if case.raw_http is not None:
        return _raw_http(server.port, case.raw_http)
    if case.chunked_mib:
        spaces = (b" " * 2**20 for _ in range(case.chunked_mib))
        return http.post(case.path, content=spaces, headers={"Content-Type": "application/json"})
    if case.content is not None:
        return http.post(case.path, content=case.content,
                         headers={"Content-Type": "application/json"})
    return http.request(case.method, case.path, json=case.json)


def test_abusive_requests_get_their_4xx(server, http, media, image_host, schemas):
    cases = _cases(media, image_host.url, image_host.server.server_address[1])
    assert len(cases) >= 60
    failures = []
    for name, case in cases.items():
        response = _send(server, http, case)
        try:
            error = check_error(response, case.status, schemas)
            assert case.says in error["message"], error["message"]
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


def test_unusual_but_valid_images_are_served(http):
    """1x1, extreme aspect ratios, CMYK, 16-bit and animated images are images: served like
    their RGB conversion (an animated GIF by its first frame), never a 500."""
    rng = np.random.default_rng(0)
    frames = [make_image(40, 60, seed=s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    first_frame = Image.open(io.BytesIO(gif.getvalue())).convert("RGB")
    cmyk = io.BytesIO()
    make_image(40, 60).convert("CMYK").save(cmyk, format="JPEG")
    sixteen = Image.fromarray(rng.integers(0, 65535, (40, 60), dtype=np.uint16))
    # (bytes, detail, the RGB image it must answer like). Full detail where the aspect ratio
    # matters (LLaVA-NeXT's tiling and unpadding), the base tile only elsewhere (quicker).
    cases = {
        "1x1": (png_bytes(Image.new("RGB", (1, 1), (200, 30, 30))), "auto", None),
        "1x1000": (png_bytes(Image.new("L", (1, 1000), 90)), "auto", None),
        "cmyk": (cmyk.getvalue(), "low", None),
        "16-bit": (png_bytes(sixteen), "low", None),
        "animated-gif": (gif.getvalue(), "low", first_frame),
    }
    for name, (data, detail, same_as) in cases.items():
        r = http.post("/v1/chat/completions", json=_chat(
            messages=_message(_data_url(data), detail=detail), max_tokens=4, temperature=0))
        assert r.status_code == 200, (name, r.text)
        assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] > 0
        if same_as is not None:
            r2 = http.post("/v1/chat/completions", json=_chat(
                messages=_message(_data_url(png_bytes(same_as)), detail=detail), max_tokens=4,
                temperature=0))
            assert r2.json()["choices"] == r.json()["choices"], name


def test_still_healthy_and_nothing_crashed(server, http):
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=_chat(messages=MSG))
    assert r.status_code == 200, r.text
    log = server.log.getvalue()
    assert "Traceback" not in log and "unexpected error" not in log, server.output()
    assert wait_idle(server)["caldera_kv_cache_usage_perc"] == 0


# ---- 300 streams, a third of them hanging up -------------------------------------------------

STREAMS = 300
CONCURRENCY = 32
PROMPTS = [f"Request {i}: describe item {i * 7} in a few words." for i in range(6)]


def _stream_body(i: int) -> dict:
    return {"model": "tiny", "stream": True, "temperature": 0, "ignore_eos": True,
            "max_tokens": 3 + i % 4, "messages": [{"role": "user", "content": PROMPTS[i]}]}


async def _read_stream(client: httpx.AsyncClient, body: dict,
                       hang_up_after: int | None = None) -> str | None:
    """The streamed text, or None when this client hangs up after ``hang_up_after`` events."""
    text, events = "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        if hang_up_after == 0:
            return None
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                return text
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content") or ""
            events += 1
            if hang_up_after is not None and events >= hang_up_after:
                return None
    raise AssertionError("the stream ended without [DONE]")


async def _hang_up_before_the_answer(port: int, body: dict) -> None:
    """Sends the request and closes the socket without reading anything."""
    payload = json.dumps(body).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
                 + payload)
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def _burst(server: ServerProcess, plan: list[tuple[int, int | None]],
                 concurrency: int) -> list[str | None]:
    """Runs ``plan`` ((prompt index, hang-up point: None to read to the end, -1 before the
    answer, else after that many events)) ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:

        async def one(index: int, hang_up: int | None) -> str | None:
            async with gate:
                if hang_up == -1:
                    await _hang_up_before_the_answer(server.port, _stream_body(index))
                    return None
                return await _read_stream(client, _stream_body(index), hang_up)

        return await asyncio.gather(*(one(i, h) for i, h in plan))


def test_300_streams_with_a_third_hanging_up(server):
    alone = [asyncio.run(_burst(server, [(i, None)], 1))[0] for i in range(len(PROMPTS))]
    # Warm up at full concurrency, so pools that grow on demand (threads, connections) have
    # grown before the baseline is read.
    asyncio.run(_burst(server, [(i % len(PROMPTS), None) for i in range(CONCURRENCY)],
                       CONCURRENCY))
    assert wait_idle(server)["caldera_kv_cache_usage_perc"] == 0
    fds, threads = resources(server)

    rng = random.Random(0)
    plan: list[tuple[int, int | None]] = []
    for n in range(STREAMS):
        index = rng.randrange(len(PROMPTS))
        hang_up = rng.randint(-1, _stream_body(index)["max_tokens"]) if n % 3 == 0 else None
        plan.append((index, hang_up))
    texts = asyncio.run(_burst(server, plan, CONCURRENCY))
    for (index, hang_up), text in zip(plan, texts):
        if hang_up is None:
            assert text == alone[index], (index, text, alone[index])

    m = wait_idle(server)
    assert m["caldera_num_requests_running"] == 0 and m["caldera_num_requests_waiting"] == 0
    assert m["caldera_kv_cache_usage_perc"] == 0, "a KV block is still held"
    assert m["caldera_num_requests_in_flight"] == 0
    # Open files and threads of both processes are back to the baseline: no socket, pipe or
    # thread is left behind by a client that went away.
    deadline = time.monotonic() + 10
    while resources(server) != (fds, threads) and time.monotonic() < deadline:
        time.sleep(0.2)
    after = resources(server)
    assert after[0] <= fds, f"descriptors: {fds} before, {after[0]} after"
    assert after[1] <= threads, f"threads: {threads} before, {after[1]} after"
