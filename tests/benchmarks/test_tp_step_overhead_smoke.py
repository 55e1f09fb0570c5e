"""The tensor-parallel step benchmark runs end to end on a tiny checkpoint over the session's
Ray runtime: the ranks' per-step times line up with the driver's steps (no timing checks)."""

from __future__ import annotations

import argparse

from caldera.benchmarks.tp_step_overhead import _decode_step, run_engine, run_transport


def test_tp2_step_split_is_reported(ray_runtime, llava15_dir):
    args = argparse.Namespace(batch=2, prompt_len=8, steps=3, warmup=1)
    result = run_engine(llava15_dir, 2, args)
    assert set(result) == {"call", "rank", "collectives", "overhead"}
    assert result["call"] > 0 and 0 < result["rank"] <= result["call"]
    assert 0 <= result["collectives"] <= result["rank"]


def test_transport_alone_three_ways(ray_runtime, llava15_dir):
    args = argparse.Namespace(batch=2, prompt_len=8)
    result = run_transport(_decode_step(llava15_dir, args), rounds=3, idle_seconds=0.1)
    assert set(result) == {"connections", "compiled", "plain", "connections_idle",
                           "compiled_idle"}
    assert all(seconds >= 0 for seconds in result.values())
