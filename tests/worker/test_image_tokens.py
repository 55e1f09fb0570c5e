"""The number of image tokens equals transformers' for random image sizes (LLaVA-NeXT's
unpadding rounding is where engines go wrong), and the model produces exactly that many
embeddings."""

from __future__ import annotations

import random

import pytest
import torch
from support import make_image

from caldera.worker.config import ModelConfig


def _random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1, 1), (1, 2000), (2000, 1), (336, 336), (672, 336), (337, 673), (1008, 336)]
    while len(sizes) < count:
        kind = rng.random()
        if kind < 0.4:
            sizes.append((rng.randint(1, 4000), rng.randint(1, 4000)))
        elif kind < 0.8:
            h = rng.randint(50, 2000)
            sizes.append((h, max(1, int(h * rng.choice([0.5, 1.5, 2.0, 3.0, 1 / 3, 0.75]))
                                 + rng.randint(-2, 2))))
        else:
            sizes.append((rng.randint(1, 60), rng.randint(1, 60)))
    return sizes


@pytest.mark.parametrize("shape", ["llava-1.5", "llava-next-mistral", "llava-next-vicuna"])
def test_counts_match_transformers(shape, tiny_checkpoints):
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(tiny_checkpoints[shape])
    config = ModelConfig.from_model_dir(tiny_checkpoints[shape])
    sizes = _random_sizes(200, seed=sum(map(ord, shape)))
    expected = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
    assert [config.num_image_tokens(s) for s in sizes] == expected


def test_model_embeddings_fill_the_count(loaded_models):
    loaded = loaded_models["llava-next-mistral"]
    for i, (h, w) in enumerate([(1, 1), (37, 1000), (999, 333), (500, 501)]):
        processed = loaded.processor.image_processor.preprocess(make_image(h, w, seed=i))
        with torch.inference_mode():
            embeds = loaded.model.encode_image(processed.pixel_values, processed.image_size)
        assert embeds.shape[0] == loaded.config.num_image_tokens((h, w))
