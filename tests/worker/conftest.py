"""Fixtures for model-level tests: our model + runner and the transformers reference on the
same tiny checkpoint, and a hand-driven batch loop (the scheduler's job, done by hand)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from support import BLOCK_SIZE

from caldera.engine.processor import InputProcessor
from caldera.worker.config import ModelConfig
from caldera.worker.loader import load_model
from caldera.worker.model_runner import ModelRunner


@dataclass
class Loaded:
    name: str
    path: object
    config: ModelConfig
    processor: InputProcessor
    model: torch.nn.Module

    def runner(self, num_blocks: int = 1024) -> ModelRunner:
        return ModelRunner(self.model, self.config, num_blocks=num_blocks, block_size=BLOCK_SIZE,
                           device=torch.device("cpu"), dtype=torch.float32, eos_token_ids=[2])


@pytest.fixture(scope="session")
def loaded_models(tiny_checkpoints) -> dict[str, Loaded]:
    out = {}
    for name, path in tiny_checkpoints.items():
        config = ModelConfig.from_model_dir(path)
        model = load_model(path, config, dtype=torch.float32, device=torch.device("cpu"),
                           progress=False)
        out[name] = Loaded(name, path, config, InputProcessor(path, config), model)
    return out


@pytest.fixture(scope="session")
def hf_models(tiny_checkpoints):
    transformers = pytest.importorskip("transformers")
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            path = tiny_checkpoints[name]
            processor = transformers.AutoProcessor.from_pretrained(path)
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                path, dtype=torch.float32
            ).eval()
            cache[name] = (processor, model)
        return cache[name]

    return get
