"""The engine failing mid-generation: the model's forward raises at step k (the engine's
test-only CALDERA_TEST_FAIL_AT_STEP hook). Every request in flight gets an error (a stream an
error event, then [DONE]), /health turns 503 within a second, later requests get 503 at once,
and SIGTERM still stops the server with no child process left."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
from robustness_support import check_error
from server_support import ServerProcess

from caldera.engine.core_client import TEST_FAIL_AT_STEP_ENV

FAIL_AT_STEP = 12


@pytest.fixture(scope="module")
def server(next_mistral_dir):
    proc = ServerProcess([
        "--model", str(next_mistral_dir), "--kv-cache-memory", "64MiB", "--max-model-len", "2048",
        "--max-num-seqs", "8", "--no-ui",
    ], env={TEST_FAIL_AT_STEP_ENV: str(FAIL_AT_STEP)})
    yield proc
    proc.stop()


def _body(i: int, stream: bool) -> dict:
    return {"model": "default", "max_tokens": 1000, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"Request {i}: go on and on."}]}


def test_a_failing_forward_fails_every_request_and_the_health_check(server, schemas):
    results: dict[int, tuple] = {}
    first_error = threading.Event()

    def run(i: int) -> None:
        stream = i % 2 == 0
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            if stream:
                with c.stream("POST", "/v1/chat/completions", json=_body(i, True)) as r:
                    events = []
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: "):])
                            if "error" in events[-1]:
                                first_error.set()
                results[i] = (r.status_code, events)
            else:
                r = c.post("/v1/chat/completions", json=_body(i, False))
                first_error.set()
                results[i] = (r.status_code, r)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    assert first_error.wait(timeout=120), "no request saw the failure"
    deadline = time.monotonic() + 1.0
    with httpx.Client(base_url=server.base_url, timeout=5) as c:
        while (health := c.get("/health")).status_code != 503:
            assert time.monotonic() < deadline, "/health still 200 a second after the failure"
            time.sleep(0.02)
        assert "injected test fault" in health.json()["reason"]
        for t in threads:
            t.join(timeout=30)
            assert not t.is_alive(), "a request hangs after the engine failed"

        for i in range(4):
            status, got = results[i]
            if i % 2 == 0:  # the stream's role chunk and some tokens, an error event, [DONE]
                assert status == 200
                assert got[-1] == "[DONE]"
                error = json.loads(got[-2])["error"]
                schemas.validate({"error": error}, "ErrorResponse")
                assert error["code"] == "engine_dead" and "injected" in error["message"]
                assert len(got) > 3, got
            else:
                assert check_error(got, 503, schemas)["code"] == "engine_dead"
        # Later requests fail at once, streamed or not.
        for stream in (False, True):
            r = c.post("/v1/chat/completions", json={**_body(9, stream), "max_tokens": 2})
            assert check_error(r, 503, schemas)["code"] == "engine_dead"
        assert c.get("/v1/models").status_code == 200

    assert server.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
