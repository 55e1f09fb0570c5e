"""``caldera serve --tensor-parallel-size 2`` on the session's Ray runtime (two CPU worker
actors over gloo): the same greedy text as one worker, and a worker killed mid-stream ends the
stream with an error, turns /health to 503, and leaves nothing hanging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from server_support import ServerProcess, descendants
from support import greedy_chat_text

ENGINE = ["--kv-cache-memory", "32MiB", "--max-model-len", "4096", "--no-ui"]
MESSAGES = [{"role": "user", "content": "Describe a mountain in winter."}]
STREAM_READER = """
import sys, httpx
with httpx.stream("POST", sys.argv[1], content=sys.argv[2], timeout=60,
                  headers={"content-type": "application/json"}) as r:
    for line in r.iter_lines():
        if line.startswith("data: "):
            print(line[6:].replace(" ", ""), flush=True)
"""


def _ray_worker_pids() -> list[int]:
    """Worker actors of this session's Ray runtime (its processes descend from this one)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayWorker"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def test_tp2_server_matches_tp1_then_survives_a_dead_worker(ray_runtime, next_mistral_dir):
    expected = greedy_chat_text(next_mistral_dir, MESSAGES, 24, kv_cache_memory="32MiB",
                                max_model_len=4096)
    before = set(_ray_worker_pids())
    server = ServerProcess(["--model", str(next_mistral_dir), "--tensor-parallel-size", "2",
                            *ENGINE])
    try:
        client = openai.OpenAI(api_key="none", base_url=server.base_url + "/v1/",
                               max_retries=0)
        reply = client.chat.completions.create(model="default", messages=MESSAGES,
                                               temperature=0, max_tokens=24)
        assert reply.choices[0].message.content == expected
        workers = [p for p in _ray_worker_pids() if p not in before]
        assert len(workers) == 2, workers

        # The stream is read by another process: this one hosts the Ray driver.
        body = {"model": "default", "messages": MESSAGES, "max_tokens": 3000,
                "ignore_eos": True, "stream": True}
        reader = subprocess.Popen(
            [sys.executable, "-c", STREAM_READER, server.base_url + "/v1/chat/completions",
             json.dumps(body)], stdout=subprocess.PIPE, text=True)
        assert reader.stdout is not None
        first = reader.stdout.readline()
        assert first.startswith("{"), first
        os.kill(workers[1], signal.SIGKILL)
        try:
            rest, _ = reader.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            reader.kill()
            raise AssertionError("the stream hangs after its worker died") from None
        events = [first.strip(), *rest.split()]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert "rank" in error["message"], error
        deadline = time.monotonic() + 5
        while httpx.get(server.base_url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/health still says 200"
            time.sleep(0.1)
        late = httpx.post(server.base_url + "/v1/chat/completions", timeout=10,
                          json={"model": "default", "messages": MESSAGES, "max_tokens": 2})
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_dead"
    finally:
        server.stop()
