"""A Ray Serve replica that owns its tensor-parallel workers: one replica of the application
with ``tensor_parallel_size=2`` on the session's 2-CPU Ray runtime (the replica and its two
ranks share the CPUs through ``num_cpus`` and ``cpus_per_rank``), answering through the openai
client with the text one worker gives."""

from __future__ import annotations

import openai
import pytest
from server_support import free_port
from support import greedy_chat_text

pytest.importorskip("ray.serve")

from caldera.deploy.serve import app_builder  # noqa: E402

APP = "caldera-tp"
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


def test_a_replica_runs_its_model_over_two_ranks_in_its_placement_group(ray_runtime,
                                                                         next_mistral_dir):
    from ray import serve
    from ray.util import placement_group_table

    expected = greedy_chat_text(next_mistral_dir, MESSAGES, 12, kv_cache_memory="16MiB",
                                max_model_len=2048)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app_builder({
            "model": str(next_mistral_dir), "served_model_name": "tiny", "device": "cpu",
            "kv_cache_memory": "16MiB", "max_model_len": "2048", "max_num_seqs": "4",
            "no_ui": "true", "tensor_parallel_size": "2", "num_replicas": "1",
            "num_cpus": "0.5", "cpus_per_rank": "0.75",
        }), name=APP, route_prefix="/", blocking=False)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                               timeout=180, max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                               max_tokens=12)
        assert reply.choices[0].message.content == expected

        # One placement group, the replica's: its own bundle, then one per rank (no second
        # group competing for the same CPUs).
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 1
        assert list(groups[0]["bundles"].values()) == [
            {"CPU": 0.5}, {"CPU": 0.75}, {"CPU": 0.75}]
    finally:
        serve.delete(APP)
        serve.shutdown()
