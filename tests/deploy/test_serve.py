"""The Ray Serve application (caldera.deploy.serve): two replicas of ``caldera serve`` behind
Serve's proxy on a loopback port, driven through the openai client; every replica's caldera_
metrics reach the Ray metrics agent's endpoint. Also the application's arguments."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from server_support import free_port

pytest.importorskip("ray.serve")

from caldera.deploy.serve import (  # noqa: E402
    DeployArgumentError,
    ReplicaOptions,
    app_builder,
    caldera_deployment,
    read_caldera_args,
    read_replica_options,
    replica_resources,
)

APP = "caldera"
PROMPT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def serve_url(ray_runtime, llava15_dir):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = app_builder({
        "model": str(llava15_dir), "served_model_name": "tiny", "device": "cpu",
        "kv_cache_memory": "16MiB", "max_model_len": "1024", "max_num_seqs": "8",
        "no_ui": "true", "num_replicas": "2", "num_cpus": "1",
    })
    try:
        serve.run(app, name=APP, route_prefix="/", blocking=False)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_two_replicas_answer_chat_through_the_openai_client(serve_url, ray_runtime):
    from ray import serve

    deployment = serve.status().applications[APP].deployments["Caldera"]
    assert deployment.status == "HEALTHY"
    assert deployment.replica_states == {"RUNNING": 2}

    client = openai.OpenAI(base_url=serve_url + "/v1", api_key="unused", timeout=120)

    def chat(_: int) -> str:
        completion = client.chat.completions.create(
            model="tiny", messages=PROMPT, max_tokens=6, temperature=0)
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 6
        return completion.choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(chat, range(6)))
    # Greedy over the same weights: whichever replica answered, the same text.
    assert len(set(answers)) == 1 and answers[0]

    stream = client.chat.completions.create(model="tiny", messages=PROMPT, max_tokens=6,
                                            temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream
                       if chunk.choices)
    assert streamed == answers[0]
    assert [m.id for m in client.models.list().data] == ["tiny"]

    # An image, decoded and preprocessed by the replica's image worker process.
    image = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 120, 200)).save(image, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(image.getvalue()).decode()
    completion = client.chat.completions.create(model="tiny", max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is it?"}]}])
    assert completion.usage.prompt_tokens > 576  # the image's tokens and the text's

    # Each replica's counters, labelled by replica, at the node's Ray metrics endpoint.
    node = ray_runtime.nodes()[0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + 90
    while True:
        finished = _replica_sums(httpx.get(url, timeout=10).text,
                                 "ray_caldera_request_success_total")
        if sum(finished.values()) == 8 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert sum(finished.values()) == 8, finished
    assert {(app, deployment) for app, deployment, _ in finished} == {(APP, "Caldera")}


def _replica_sums(text: str, name: str) -> dict[tuple[str, str, str], float]:
    """``name``'s samples summed per (application, deployment, replica)."""
    sums: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = (sample.labels["application"], sample.labels["deployment"],
                       sample.labels["replica"])
                sums[key] = sums.get(key, 0.0) + sample.value
    return sums


# ---- arguments --------------------------------------------------------------------------------


def test_arguments_are_caldera_serve_options_read_by_its_parser(llava15_dir):
    server, engine = read_caldera_args({
        "model": str(llava15_dir), "max_model_len": 2048, "served_model_name": ["a", "b"],
        "allowed_local_media_path": ["/srv/images"], "no_enable_prefix_caching": True,
        "no_ui": "true", "api_key": "k", "tensor_parallel_size": "2",
    })
    assert engine.max_model_len == 2048 and engine.tensor_parallel_size == 2
    assert engine.enable_prefix_caching is False
    assert engine.allowed_local_media_paths == ("/srv/images",)
    assert server.served_model_names == ("a", "b") and server.api_key == "k"
    assert server.ui is False

    with pytest.raises(DeployArgumentError, match="unknown argument 'max_model_length'"):
        read_caldera_args({"model": str(llava15_dir), "max_model_length": 1})
    with pytest.raises(DeployArgumentError, match="Serve's proxy"):
        read_caldera_args({"model": str(llava15_dir), "port": 8000})
    with pytest.raises(DeployArgumentError, match="max-num-seqs"):
        read_caldera_args({"model": str(llava15_dir), "max_num_seqs": "many"})
    with pytest.raises(DeployArgumentError, match="--model"):
        read_caldera_args({})


def test_replica_resources_and_scaling(llava15_dir):
    _, tp1 = read_caldera_args({"model": str(llava15_dir), "device": "cuda"})
    assert replica_resources(tp1, ReplicaOptions(num_cpus=4)) == {
        "ray_actor_options": {"num_cpus": 4, "num_gpus": 1}}

    _, tp2 = read_caldera_args({"model": str(llava15_dir), "device": "cuda",
                                "tensor_parallel_size": 2})
    assert replica_resources(tp2, ReplicaOptions()) == {
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0},
        "placement_group_bundles": [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}],
        "placement_group_strategy": "PACK",
    }

    options = read_replica_options({"min_replicas": "1", "max_replicas": "3", "num_cpus": "2",
                                    "model": "ignored"})
    assert options == ReplicaOptions(min_replicas=1, max_replicas=3, num_cpus=2.0)
    server, engine = read_caldera_args({"model": str(llava15_dir), "device": "cpu",
                                        "max_num_seqs": 64})
    deployment = caldera_deployment(server, engine, options)
    assert deployment.max_ongoing_requests == 64  # one full batch per replica
    autoscaling = deployment._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert autoscaling.target_ongoing_requests == 32
    assert deployment.ray_actor_options["num_cpus"] == 2.0

    with pytest.raises(DeployArgumentError, match="not both"):
        app_builder({"model": str(llava15_dir), "num_replicas": 2, "max_replicas": 3})
    with pytest.raises(DeployArgumentError, match="placement_group_strategy"):
        app_builder({"model": str(llava15_dir), "placement_group_strategy": "TIGHT"})
