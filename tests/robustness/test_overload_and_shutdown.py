"""Overload and shutdown on one small server (2 running, 2 queued): past the queue limit a
request gets 429 with Retry-After before any of its images is fetched; SIGTERM with requests in
flight lets them finish, then the server exits with no child process left."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from robustness_support import PUBLIC_LAUNCHER, check_error, metrics_once, wait_idle
from server_support import ServerProcess, alive, descendants, sse_events

MAX_NUM_SEQS = 2
MAX_QUEUED = 2
# uvicorn re-raises the signal it stopped on after its graceful shutdown.
CLEAN_EXITS = (0, -signal.SIGTERM)


@pytest.fixture(scope="module")
def server(next_mistral_dir):
    proc = ServerProcess([
        "--model", str(next_mistral_dir), "--kv-cache-memory", "64MiB", "--max-model-len", "2048",
        "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queued-requests", str(MAX_QUEUED), "--no-ui",
    ], launcher=PUBLIC_LAUNCHER)
    yield proc
    proc.stop()  # no-op when a test stopped it; still checks no child is left


def _long(max_tokens: int, stream: bool, text: str = "Go on.") -> dict:
    return {"model": "default", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "temperature": 0, "messages": [{"role": "user", "content": text}]}


def _wait_in_flight(server: ServerProcess, count: int) -> None:
    deadline = time.monotonic() + 60
    while metrics_once(server)["caldera_num_requests_in_flight"] < count:
        assert time.monotonic() < deadline, "the requests never became in flight"
        time.sleep(0.05)


def test_past_the_queue_limit_429_before_any_image_work(server, image_host, schemas):
    held = []
    clients = [httpx.Client(base_url=server.base_url, timeout=60)
               for _ in range(MAX_NUM_SEQS + MAX_QUEUED)]
    try:
        for c in clients:  # streams held open: 2 running and 2 waiting
            stream = c.stream("POST", "/v1/chat/completions", json=_long(1500, True))
            response = stream.__enter__()
            assert response.status_code == 200
            held.append(stream)
        _wait_in_flight(server, MAX_NUM_SEQS + MAX_QUEUED)
        before = metrics_once(server)
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            for i in range(6):
                body = {"model": "default", "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"{image_host.url}/ok.png?n={i}"}},
                    {"type": "text", "text": "What is it?"}]}], "stream": i % 2 == 0}
                r = c.post("/v1/chat/completions", json=body)
                error = check_error(r, 429, schemas)
                assert error["type"] == "rate_limit_error"
                assert int(r.headers["retry-after"]) >= 1
        after = metrics_once(server)
        assert not [h for h in image_host.hits if h.startswith("/ok.png")], image_host.hits
        assert after["caldera_image_fetch_seconds_count"] == \
            before["caldera_image_fetch_seconds_count"]
    finally:
        for stream in held:
            stream.__exit__(None, None, None)
        for c in clients:
            c.close()
    wait_idle(server)
    with httpx.Client(base_url=server.base_url, timeout=60) as c:  # room again: served
        r = c.post("/v1/chat/completions", json={"model": "default", "max_tokens": 2, "messages": [
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{image_host.url}/ok.png",
                                                    "detail": "low"}},
                {"type": "text", "text": "What is it?"}]}]})
    assert r.status_code == 200, r.text
    assert image_host.hits.count("/ok.png") == 1


def test_sigterm_drains_requests_in_flight(server):
    # Long enough that the first two are still running when the last two are queued: the
    # test waits for all four to be in flight before it signals.
    tokens = 160
    results: dict[int, object] = {}

    def run(i: int) -> None:
        stream = i % 2 == 0
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            body = _long(tokens, stream, text=f"Request {i}.")
            if stream:
                with c.stream("POST", "/v1/chat/completions", json=body) as r:
                    events = sse_events(r)
                chunks = [json.loads(e) for e in events[:-1]]
                results[i] = (r.status_code, events[-1],
                              [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]])
            else:
                r = c.post("/v1/chat/completions", json=body)
                results[i] = (r.status_code, r.json()["usage"]["completion_tokens"])

    count = MAX_NUM_SEQS + MAX_QUEUED
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    _wait_in_flight(server, count)
    children = descendants(server.proc.pid)
    server.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    # uvicorn's grace period is 30 s; the requests need far less.
    code = server.proc.wait(timeout=60)
    assert code in CLEAN_EXITS, server.output()
    for i in range(count):
        if i % 2 == 0:
            status, last, reasons = results[i]
            assert status == 200 and last == "[DONE]" and reasons[-1] == "length", results[i]
        else:
            assert results[i] == (200, tokens), results[i]
    deadline = time.monotonic() + 10
    while any(alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if alive(p)], "the engine process outlived the server"
