"""``caldera serve`` as users drive it: the real server on a loopback port, the real openai
client and raw HTTP, on a tiny LLaVA-NeXT (Mistral) checkpoint."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
import zlib

import httpx
import openai
import pytest
from PIL import Image
from server_support import (
    OpenAISchemas,
    ServerProcess,
    image_server,
    png_bytes,
    read_metrics,
    sse_events,
)
from support import make_image

API_KEY = "sk-test-key"
# uvicorn re-raises the signal it stopped on after its graceful shutdown.
CLEAN_EXITS = (0, -signal.SIGTERM, -signal.SIGINT)
PADDED_ID = 32050  # inside the model's 32064 logits, past the tokenizer's 32002 tokens


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    outside = root / "outside"
    outside.mkdir()
    image = make_image(200, 300, seed=3)
    image.save(allowed / "photo.png")
    image.save(outside / "secret.png")
    (allowed / "link.png").symlink_to(outside / "secret.png")
    with image_server({"/photo.png": png_bytes(image)}) as url:
        yield {"allowed": allowed, "outside": outside, "url": url + "/photo.png",
               "png": png_bytes(image)}


@pytest.fixture(scope="module")
def server(next_mistral_dir, media):
    proc = ServerProcess([
        "--model", str(next_mistral_dir), "--served-model-name", "tiny", "llava-tiny",
        "--kv-cache-memory", "64MiB", "--max-model-len", "8192", "--max-num-seqs", "16",
        "--allowed-local-media-path", str(media["allowed"]), "--allow-private-media-urls",
        "--limit-images-per-prompt", "3", "--no-ui",
    ], api_key=API_KEY)
    yield proc
    assert proc.stop() in CLEAN_EXITS


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=server.base_url + "/v1/", max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def schemas():
    return OpenAISchemas()


def _chat(http, schemas, **body) -> dict:
    body.setdefault("model", "tiny")
    body.setdefault("max_tokens", 6)
    body.setdefault("temperature", 0)
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    schemas.validate(data, "CreateChatCompletionResponse")
    return data


def _stream(http, schemas, **body) -> tuple[str, list[dict]]:
    body.setdefault("model", "tiny")
    body.setdefault("temperature", 0)
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        schemas.validate(chunk, "CreateChatCompletionStreamResponse")
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def _image_message(url: str, text: str = "What is shown in this image?", **extra) -> list:
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url, **extra}},
        {"type": "text", "text": text},
    ]}]


# ---- images --------------------------------------------------------------------------------


def test_every_image_form_gives_the_same_answer(http, schemas, media):
    data_url = "data:image/png;base64," + base64.b64encode(media["png"]).decode()
    raw = base64.b64encode(media["png"]).decode()
    path = str(media["allowed"] / "photo.png")
    texts = set()
    for source in (media["url"], data_url, raw, path, "file://" + path):
        data = _chat(http, schemas, messages=_image_message(source))
        assert data["usage"]["prompt_tokens_details"]["image_tokens"] > 576
        texts.add(data["choices"][0]["message"]["content"])
    assert len(texts) == 1  # same pixels, same greedy answer, whatever the source


def test_seed_marker_in_text_and_template_placement_agree(http, schemas, media):
    written = _chat(http, schemas, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media["url"]}},
        {"type": "text", "text": "<image>What is shown in this image?"}]}])
    placed = _chat(http, schemas, messages=_image_message(media["url"]))
    assert written["usage"]["prompt_tokens_details"]["image_tokens"] == \
        placed["usage"]["prompt_tokens_details"]["image_tokens"]


@pytest.mark.parametrize("where", ["outside", "dotdot", "symlink"])
def test_local_paths_outside_the_allowed_folder_are_refused(http, media, where):
    allowed, outside = media["allowed"], media["outside"]
    path = {"outside": str(outside / "secret.png"),
            "dotdot": f"{allowed}/../outside/secret.png",
            "symlink": str(allowed / "link.png")}[where]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2,
                                                "messages": _image_message(path)})
    assert r.status_code == 400, r.text
    assert "--allowed-local-media-path" in r.json()["error"]["message"]


def test_detail_low_serves_the_base_tile_only(http, schemas, media):
    data = _chat(http, schemas, messages=_image_message(media["url"], detail="low"))
    assert data["usage"]["prompt_tokens_details"]["image_tokens"] == 576


def test_several_images_and_count_mismatch(http, schemas, media):
    two = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media["url"]}},
        {"type": "image_url", "image_url": {"url": media["url"], "detail": "low"}},
        {"type": "text", "text": "Compare them."}]}]
    data = _chat(http, schemas, messages=two)
    assert data["usage"]["prompt_tokens_details"]["image_tokens"] > 2 * 576
    mismatch = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": media["url"]}},
        {"type": "text", "text": "<image> and <image>?"}]}]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": mismatch})
    assert r.status_code == 400 and "<image>" in r.json()["error"]["message"]


# ---- generation ----------------------------------------------------------------------------


def test_streamed_text_equals_the_full_response(http, schemas, media):
    messages = _image_message(media["url"], "Describe it.")
    full = _chat(http, schemas, messages=messages, max_tokens=24)
    text, chunks = _stream(http, schemas, messages=messages, max_tokens=24,
                           stream_options={"include_usage": True})
    assert text == full["choices"][0]["message"]["content"]
    assert not text.startswith(" ")  # transformers' decode(skip_special_tokens=True)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        **chunks[-1]["usage"], "completion_tokens": full["usage"]["completion_tokens"]}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_openai_client_n_seed_and_stop(client):
    kwargs = dict(model="default", messages=[{"role": "user", "content": "Tell a story."}],
                  max_tokens=12, temperature=1.0, seed=1234, n=3)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == \
        [c.message.content for c in second.choices]
    greedy = client.chat.completions.create(model="tiny", messages=kwargs["messages"],
                                            max_tokens=12, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[3:6]
    stopped = client.chat.completions.create(model="tiny", messages=kwargs["messages"],
                                             max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.index(stop)]


def test_logprobs_over_the_padded_vocabulary(http, schemas):
    # logit_bias forces a token id the tokenizer has no string for: vLLM's server dies on it.
    data = _chat(http, schemas, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                 logprobs=True, top_logprobs=20, logit_bias={str(PADDED_ID): 100})
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and len(content[0]["top_logprobs"]) == 20
    assert content[0]["token"] == "" and content[0]["bytes"] == []
    tops = content[0]["top_logprobs"]
    assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
    assert http.get("/health").status_code == 200


def test_completions_echo_logprobs_and_token_prompts(http, schemas):
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": "The sky is",
                                           "max_tokens": 4, "echo": True, "logprobs": 2,
                                           "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    schemas.validate(data, "CreateCompletionResponse")
    choice = data["choices"][0]
    assert choice["text"].startswith("The sky is")
    lp = choice["logprobs"]
    prompt_len = data["usage"]["prompt_tokens"]
    # Every prompt token but the first (it has no logprob; the schema allows no null).
    assert len(lp["tokens"]) == prompt_len - 1 + 4
    assert all(isinstance(v, float) for v in lp["token_logprobs"])
    ids = http.post("/tokenize", json={"prompt": "The sky is"}).json()["tokens"]
    r2 = http.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 4,
                                            "temperature": 0})
    assert r2.json()["choices"][0]["text"] == choice["text"][len("The sky is"):]
    # As vLLM's /detokenize: special tokens (the BOS) are kept.
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "<s> The sky is"


def test_models_version_tokenize_and_openapi(http, schemas, client):
    models = http.get("/v1/models").json()
    schemas.validate(models, "ListModelsResponse")
    assert [m["id"] for m in models["data"]] == ["tiny", "llava-tiny"]
    card = http.get("/v1/models/tiny").json()
    schemas.validate(card, "Model")
    assert card["max_model_len"] == 8192
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404
    schemas.validate(missing.json(), "ErrorResponse")
    assert [m.id for m in client.models.list().data] == ["tiny", "llava-tiny"]
    assert http.get("/version").json()["version"]
    spec = http.get("/openapi.json").json()
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith(
        "ChatCompletionRequest")
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ---- errors --------------------------------------------------------------------------------

_IMG = "data:image/png;base64," + base64.b64encode(png_bytes(make_image(8, 8))).decode()


def _bad_requests(media) -> list[tuple[int, object]]:
    msg = [{"role": "user", "content": "hi"}]
    huge = Image.new("L", (1, 1))
    bomb = png_bytes(huge)
    # A PNG header claiming 100000 x 100000 pixels: refused before decoding.
    ihdr = bomb[12:16] + (100000).to_bytes(4, "big") * 2 + bomb[24:29]
    bomb = bomb[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + bomb[33:]
    bomb_url = "data:image/png;base64," + base64.b64encode(bomb).decode()
    return [
        (400, b"{not json"),
        (400, b"[1, 2, 3]"),
        (400, b'"a string"'),
        (400, b""),
        (400, {"model": "tiny"}),
        (400, {"model": "tiny", "messages": "hello"}),
        (400, {"model": "tiny", "messages": []}),
        (400, {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
        (400, {"model": "tiny", "messages": msg, "n": "two"}),
        (400, {"model": "tiny", "messages": msg, "n": 0}),
        (400, {"model": "tiny", "messages": msg, "n": 10_000}),
        (400, {"model": "tiny", "messages": msg, "max_tokens": 0}),
        (400, {"model": "tiny", "messages": msg, "max_tokens": 10**9}),
        (400, {"model": "tiny", "messages": msg, "temperature": -1}),
        (400, {"model": "tiny", "messages": msg, "top_p": 2}),
        (400, {"model": "tiny", "messages": msg, "logprobs": True, "top_logprobs": 21}),
        (400, {"model": "tiny", "messages": msg, "presence_penalty": 5}),
        (400, {"model": "tiny", "messages": msg, "logit_bias": {"abc": 1}}),
        (400, {"model": "tiny", "messages": msg, "logit_bias": {"99999999": 1}}),
        (400, {"model": "tiny", "messages": msg, "tools": [{"type": "function"}]}),
        (400, {"model": "tiny", "messages": msg, "response_format": {"type": "json_object"}}),
        (400, {"model": "tiny", "messages": msg, "stream_options": {"include_usage": True}}),
        (404, {"model": "gpt-17", "messages": msg}),
        (400, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 40000}]}),
        (400, {"model": "tiny", "messages": _image_message("data:image/png;base64,!!!!")}),
        (400, {"model": "tiny", "messages": _image_message("data:image/png;base64,aGVsbG8=")}),
        (400, {"model": "tiny", "messages": _image_message("ftp://example.com/a.png")}),
        (413, {"model": "tiny", "messages": _image_message(bomb_url)}),
        (400, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _IMG}} for _ in range(4)]}]}),
        (400, {"model": "tiny", "messages": _image_message(_IMG, detail="ultra")}),
        (400, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}),
        (400, {"model": "tiny", "messages": [{"role": "tool", "content": "x",
                                              "tool_call_id": "1"}]}),
    ]


def test_malformed_and_abusive_requests_get_4xx(http, schemas, media):
    cases = _bad_requests(media)
    assert len(cases) >= 30
    for status, body in cases:
        if isinstance(body, bytes):
            r = http.post("/v1/chat/completions", content=body,
                          headers={"content-type": "application/json"})
        else:
            r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == status, (body if len(str(body)) < 300 else str(body)[:300],
                                         r.text)
        schemas.validate(r.json(), "ErrorResponse")
        assert r.json()["error"]["message"]
    assert http.post("/v1/completions", json={"prompt": [1, 99999999]}).status_code == 400
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/health").status_code == 200
    _chat(http, schemas, messages=[{"role": "user", "content": "still fine?"}])


def test_api_key_on_every_route_but_health(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/tiny"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/metrics"), ("POST", "/tokenize"),
                             ("POST", "/detokenize"), ("GET", "/version"),
                             ("GET", "/openapi.json")]:
            r = anonymous.request(method, path, json={})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
        wrong = anonymous.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    bad = openai.OpenAI(api_key="nope", base_url=server.base_url + "/v1/", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---- flow ----------------------------------------------------------------------------------


def test_disconnects_abort_and_free_every_block(server, http, schemas):
    body = {"model": "tiny", "stream": True, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Count forever."}]}
    for _ in range(3):
        with httpx.Client(base_url=server.base_url, headers=server.headers,
                          timeout=60) as c, c.stream("POST", "/v1/chat/completions",
                                                     json=body) as r:
            lines = r.iter_lines()
            for _ in range(6):
                next(lines)
    # A non-streaming request whose client gives up also ends.
    with pytest.raises(httpx.ReadTimeout), httpx.Client(
            base_url=server.base_url, headers=server.headers, timeout=1.0) as c:
        c.post("/v1/chat/completions", json={**body, "stream": False})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = read_metrics(http)
        if (m["caldera_num_requests_running"] == 0 and m["caldera_kv_cache_usage_perc"] == 0
                and m["caldera_num_requests_in_flight"] == 0):
            break
        time.sleep(0.2)
    assert m["caldera_num_requests_running"] == 0, m
    assert m["caldera_num_requests_waiting"] == 0
    assert m["caldera_kv_cache_usage_perc"] == 0
    assert m["caldera_num_requests_in_flight"] == 0
    _chat(http, schemas, messages=[{"role": "user", "content": "after"}])


def test_metrics_after_known_traffic(http, schemas):
    # A picture no other test sends, as a data URL: decoded once, then served from the
    # server's image cache.
    url = "data:image/png;base64," + base64.b64encode(png_bytes(make_image(150, 90, seed=11))
                                                      ).decode()
    before = read_metrics(http)
    _chat(http, schemas, messages=_image_message(url), max_tokens=5, ignore_eos=True)
    _chat(http, schemas, messages=_image_message(url), max_tokens=5, ignore_eos=True)
    after = read_metrics(http)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("caldera_generation_tokens_total") == 10
    assert delta("caldera_request_success_total{finished_reason=length}") == 2
    assert delta("caldera_time_to_first_token_seconds_count") == 2
    assert delta("caldera_e2e_request_latency_seconds_count") == 2
    assert delta("caldera_inter_token_latency_seconds_count") == 8
    assert delta("caldera_request_images_sum") == 2
    assert delta("caldera_request_image_tokens_sum") > 2 * 576
    assert delta("caldera_image_fetch_seconds_count") == 2  # per request
    assert delta("caldera_image_decode_seconds_count") == 1  # per image decoded
    assert delta("caldera_image_preprocess_seconds_count") == 1
    assert delta("caldera_image_cache_hits_total") == 1
    # The same image twice: encoded once, then served from the encoder or prefix cache.
    assert delta("caldera_encoder_cache_hits_total") >= 1
    assert delta("caldera_prefix_cache_hits_total") > 0
    assert delta("caldera_prompt_tokens_total") > 2 * 576
    assert after["caldera_vision_encoder_seconds_total"] > 0


def test_seed_http_example_verbatim(server, media):
    # The seed's example with only the URLs changed (its image is served on loopback).
    from openai import OpenAI

    client = OpenAI(api_key=API_KEY, base_url=f"{server.base_url}/v1/")

    completion = client.chat.completions.create(
        model="default",
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": media["url"]
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
        frequency_penalty=1.0,
        top_p=0.1,
        temperature=0,
    )
    resp = completion.choices[0].message.content
    print(resp)
    assert resp
    assert completion.usage.avg_prompt_tok_per_sec > 0  # the seed's usage figures


def test_max_queued_requests_gives_429_before_image_work(next_mistral_dir, tmp_path):
    proc = ServerProcess(["--model", str(next_mistral_dir), "--kv-cache-memory", "64MiB",
                          "--max-model-len", "4096", "--max-num-seqs", "1",
                          "--max-queued-requests", "1", "--no-ui"])
    try:
        long = {"model": "default", "max_tokens": 400, "ignore_eos": True,
                "messages": [{"role": "user", "content": "Go on."}]}
        results: list[int] = []

        def run() -> None:
            with httpx.Client(base_url=proc.base_url, timeout=120) as c:
                results.append(c.post("/v1/chat/completions", json=long).status_code)

        threads = [threading.Thread(target=run) for _ in range(2)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=proc.base_url, timeout=30) as c:
            deadline = time.monotonic() + 30
            while read_metrics(c)["caldera_num_requests_in_flight"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            # An image URL nobody serves: a 429 proves it was never fetched (else 400).
            r = c.post("/v1/chat/completions", json={
                "model": "default", "messages": _image_message("http://127.0.0.1:9/x.png")})
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"]
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert read_metrics(c)["caldera_image_fetch_seconds_count"] == 0
        for t in threads:
            t.join()
        assert results == [200, 200]
    finally:
        assert proc.stop() in CLEAN_EXITS


def test_seed_command_form_and_sigint(next_mistral_dir):
    # mistral.rs's form: caldera --port P --isq 4 vision-plain -m MODEL
    import subprocess
    import sys
    from pathlib import Path

    from server_support import alive, descendants, free_port

    port = free_port()
    exe = str(Path(sys.executable).parent / "caldera")
    proc = subprocess.Popen([exe, "--port", str(port), "--isq", "8", "--kv-cache-memory",
                             "64MiB", "--max-model-len", "4096", "--no-ui", "vision-plain",
                             "-m", str(next_mistral_dir), "-a", "llava_next"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.3)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "model": "default", "max_tokens": 3,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        children = descendants(proc.pid)
        assert children, "the engine runs in its own process"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert f"http://127.0.0.1:{port}/v1" in out  # the one startup line with the URL
        time.sleep(0.5)
        assert not [p for p in children if alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
