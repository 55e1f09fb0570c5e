"""A server killed with SIGKILL (or by the OOM killer) cannot tell its children to stop: the
engine process and the image workers notice their parent is gone and exit by themselves."""

from __future__ import annotations

import base64
import signal

from PIL import Image
from server_support import ServerProcess, descendants, png_bytes


def test_children_exit_when_the_server_is_killed(llava15_dir):
    server = ServerProcess(["--model", str(llava15_dir), "--kv-cache-memory", "32MiB",
                            "--max-model-len", "1024", "--no-ui", "--image-workers", "1"])
    url = "data:image/png;base64," + base64.b64encode(
        png_bytes(Image.new("RGB", (32, 24), (1, 2, 3)))).decode()
    with server.client() as c:  # the engine and an image worker have both done work
        r = c.post("/v1/chat/completions", json={"model": "default", "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": [
                                                     {"type": "image_url",
                                                      "image_url": {"url": url}},
                                                     {"type": "text", "text": "What?"}]}]})
    assert r.status_code == 200, r.text
    assert len(descendants(server.proc.pid)) >= 2  # engine, image worker (and the tracker)
    # stop() asserts that no child outlives the server by more than 10 s.
    assert server.stop(signal.SIGKILL) == -signal.SIGKILL
