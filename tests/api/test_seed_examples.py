"""The seed document's examples as its users run them, against Caldera: the Python API example
with only its import line (and model id / image URL) changed, the trained demo answering over
HTTP, and the interactive chat driven through a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from server_support import ServerProcess, image_server, png_bytes
from support import make_image

CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)


@pytest.fixture(scope="module")
def image_url():
    with image_server({"/mountain.png": png_bytes(make_image(333, 500, seed=7))}) as url:
        yield url + "/mountain.png"


def test_seed_python_example(next_mistral_dir, image_url):
    model_id = str(next_mistral_dir)
    # ---- the seed's example; only the import line, the model id and the URL differ ----
    from caldera.mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

    runner = Runner(
        which=Which.VisionPlain(
            model_id=model_id,
            arch=VisionArchitecture.LLaVANext,
        ),
    )

    res = runner.send_chat_completion_request(
        ChatCompletionRequest(
            model="default",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {
                                "url": image_url
                            },
                        },
                        {
                            "type": "text",
                            "text": "<image>What is shown in this image?",
                        },
                    ],
                },
            ],
            max_tokens=256,
            presence_penalty=1.0,
            top_p=0.1,
            temperature=0.1,
        )
    )
    print(res.choices[0].message.content)
    print(res.usage)
    # ---- end of the seed's example ----
    assert res.choices[0].message.content
    assert res.usage.avg_prompt_tok_per_sec > 0 and res.usage.avg_compl_tok_per_sec >= 0
    assert res.usage.prompt_tokens_details.image_tokens > 576
    runner.shutdown()


def test_runner_in_situ_quant_and_wrong_architecture(llava15_dir):
    from caldera.mistralrs import ChatCompletionRequest, Runner, VisionArchitecture, Which

    with pytest.raises(ValueError, match="LLaVANext"):
        Runner(which=Which.VisionPlain(model_id=str(llava15_dir),
                                       arch=VisionArchitecture.LLaVANext))
    with pytest.raises(ValueError, match="not served"):
        Runner(which=Which.VisionPlain(model_id=str(llava15_dir),
                                       arch=VisionArchitecture.Phi3V))
    runner = Runner(which=Which.VisionPlain(model_id=str(llava15_dir),
                                            arch=VisionArchitecture.LLaVA),
                    in_situ_quant="Q4K", kv_cache_memory="64MiB", max_model_len=2048)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages="Hello", max_tokens=4, temperature=0))
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       runner.send_chat_completion_request(ChatCompletionRequest(
                           messages="Hello", max_tokens=4, temperature=0, stream=True)))
    assert streamed == res.choices[0].message.content
    runner.shutdown()


def test_trained_demo_answers_over_http(demo_cache):
    import openai

    server = ServerProcess(["--demo", "--kv-cache-memory", "512MiB", "--no-ui"],
                           env={"CALDERA_CACHE": str(demo_cache)})
    try:
        client = openai.OpenAI(api_key="none", base_url=server.base_url + "/v1/")
        reply = client.chat.completions.create(
            model="default", temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert "RANDOM" in server.output()  # the log says the vision tower is random
    finally:
        assert server.stop() in CLEAN_EXITS


def _read_until(fd: int, marker: str, timeout: float = 240.0) -> str:
    out = ""
    deadline = time.monotonic() + timeout
    while marker not in out:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} in: {out[-2000:]}"
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk.decode(errors="replace")
    return out


@pytest.mark.parametrize("form", ["chat", "seed"])
def test_interactive_chat_in_a_terminal(next_mistral_dir, form):
    exe = str(Path(sys.executable).parent / "caldera")
    engine = ["--max-tokens", "6", "--kv-cache-memory", "32MiB", "--max-model-len", "4096"]
    argv = ([exe, "chat", "-m", str(next_mistral_dir), *engine] if form == "chat" else
            [exe, "-i", *engine, "vision-plain", "-m", str(next_mistral_dir), "-a",
             "llava_next"])
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdin=follower, stdout=follower, stderr=follower,
                            close_fds=True)
    os.close(follower)
    try:
        banner = _read_until(leader, "> ")
        assert "/image PATH_OR_URL" in banner
        assert "``" not in banner and "**" not in banner  # help without markup
        os.write(leader, b"Hello there\r")
        reply = _read_until(leader, "tokens/s]")
        assert "time to first token" in reply
        os.write(leader, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
