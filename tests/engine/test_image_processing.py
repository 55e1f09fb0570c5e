"""Image preprocessing equals transformers' CLIPImageProcessor / LlavaNextImageProcessor (the
PIL backends transformers picks without torchvision) for every PIL mode, size and aspect."""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from caldera.engine.image_processing import (
    ImageProcessor,
    ImageProcessorConfig,
    center_crop,
    resize_and_crop,
    shortest_edge_size,
)
from caldera.worker.models.image_tokens import anyres_grid_shape

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

TOLERANCE = 1e-4
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# preprocessor_config.json of llava-hf/llava-1.5-7b-hf and llava-hf/llava-v1.6-*-7b-hf.
CLIP_CONFIG = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
NEXT_CONFIG = {
    **CLIP_CONFIG,
    "aspect_ratio_setting": "anyres",
    "image_grid_pinpoints": PINPOINTS,
    "image_processor_type": "LlavaNextImageProcessor",
    "processor_class": "LlavaNextProcessor",
}
# (height, width): degenerate, square, both orientations, odd, and a 12 MP photo.
SIZES = [
    (1, 1),
    (1, 500),
    (500, 1),
    (2, 3),
    (23, 17),
    (336, 336),
    (335, 337),
    (480, 640),
    (640, 480),
    (100, 1000),
    (1000, 100),
    (1200, 300),
    (768, 1024),
    (3000, 4000),
]


def _reference(config: dict):
    kwargs = {
        k: v for k, v in config.items() if k not in ("image_processor_type", "processor_class")
    }
    kwargs.pop("aspect_ratio_setting", None)
    cls = (
        transformers.LlavaNextImageProcessor
        if "image_grid_pinpoints" in config
        else transformers.CLIPImageProcessor
    )
    return cls(**kwargs)


def _reference_pixels(reference, image: PIL.Image.Image) -> torch.Tensor:
    pixels = reference(image, return_tensors="pt")["pixel_values"][0]
    return pixels if pixels.ndim == 4 else pixels[None]


@pytest.fixture(scope="module")
def processors():
    return {
        name: (_reference(config), ImageProcessor(ImageProcessorConfig.from_dict(config)))
        for name, config in (("clip", CLIP_CONFIG), ("next", NEXT_CONFIG))
    }


def _random_image(height: int, width: int, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _assert_parity(processors, name: str, image: PIL.Image.Image) -> None:
    reference, ours = processors[name]
    expected = _reference_pixels(reference, image)
    got = ours.preprocess(image)
    assert got.pixel_values.dtype == torch.float32
    assert got.pixel_values.shape == expected.shape
    assert got.image_size == (image.height, image.width)
    assert (got.pixel_values - expected).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", ["clip", "next"])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_parity_over_sizes(processors, name, size):
    _assert_parity(processors, name, _random_image(*size, seed=size[0] * 7 + size[1]))


def _mode_images() -> dict[str, PIL.Image.Image]:
    rng = np.random.default_rng(1)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (61, 47, 4), dtype=np.uint8), "RGBA")
    modes = ["RGB", "RGBA", "L", "LA", "P", "PA", "CMYK", "1", "RGBa", "YCbCr", "HSV", "RGBX"]
    images = {mode: rgba.convert(mode) for mode in modes}
    images["I;16"] = PIL.Image.fromarray(rng.integers(0, 65536, (61, 47)).astype(np.uint16))
    images["I"] = PIL.Image.fromarray(rng.integers(-300, 600, (61, 47)).astype(np.int32))
    images["F"] = PIL.Image.fromarray(rng.normal(100, 120, (61, 47)).astype(np.float32))
    for mode, transparency in [("P", 3), ("L", 5), ("RGB", (1, 2, 3))]:
        image = rgba.convert("RGB").convert(mode)
        image.info["transparency"] = transparency
        images[f"{mode}+transparency"] = image
    palette_alpha = rgba.convert("RGB").quantize(16)
    palette_alpha.info["transparency"] = bytes(range(0, 256, 16))
    images["P+palette-alpha"] = palette_alpha
    return images


MODE_IMAGES = _mode_images()


@pytest.mark.parametrize("name", ["clip", "next"])
@pytest.mark.parametrize("mode", list(MODE_IMAGES))
def test_parity_over_modes(processors, name, mode):
    _assert_parity(processors, name, MODE_IMAGES[mode])


def test_rgba_is_composited_onto_white(processors):
    transparent = PIL.Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    _, ours = processors["clip"]
    white = ours.preprocess(PIL.Image.new("RGB", (40, 30), (255, 255, 255)))
    assert torch.equal(ours.preprocess(transparent).pixel_values, white.pixel_values)


@pytest.mark.parametrize("name", ["clip", "next"])
def test_premultiplied_la_does_not_crash(processors, name):
    # transformers raises on "La" (Pillow has no La -> RGB conversion); we go through LA.
    image = PIL.Image.new("LA", (30, 20), (120, 200)).convert("La")
    _, ours = processors[name]
    expected = ours.preprocess(PIL.Image.new("LA", (30, 20), (120, 200)))
    got = ours.preprocess(image)
    assert (got.pixel_values - expected.pixel_values).abs().max() < 0.05


@pytest.mark.parametrize("size", [(1, 1), (300, 1000), (1000, 300), (600, 600), (20, 4000)])
def test_anyres_tile_count_matches_the_token_count_grid(processors, size):
    _, ours = processors["next"]
    rows, cols = anyres_grid_shape(size, PINPOINTS, 336)
    result = ours.preprocess(_random_image(*size))
    assert result.num_tiles == 1 + rows * cols
    assert result.pixel_values.shape[1:] == (3, 336, 336)


def test_extremely_thin_image_stays_cheap(processors):
    # A full shortest-edge resize would be 336 x 33.6M pixels; only the crop is computed.
    _, ours = processors["clip"]
    result = ours.preprocess(PIL.Image.new("L", (100_000, 1), 90))
    assert result.pixel_values.shape == (1, 3, 336, 336)


@pytest.mark.parametrize("resample", [2, 3, 4])
@pytest.mark.parametrize(
    ("size", "crop"),
    [((1, 37), (336, 336)), ((45, 3), (336, 300)), ((7, 900), (200, 336)), ((120, 13), (336, 100))],
)
def test_windowed_resize_is_byte_equal_to_pil(size, crop, resample):
    image = _random_image(*size, seed=resample)
    target = shortest_edge_size(*size, 336)
    expected = center_crop(np.array(image.resize(target[::-1], resample)), crop)
    np.testing.assert_array_equal(resize_and_crop(image, target, crop, resample), expected)


@pytest.mark.parametrize(
    "overrides",
    [
        {"size": {"height": 300, "width": 400}, "crop_size": {"height": 350, "width": 350}},
        {"do_center_crop": False, "size": {"shortest_edge": 200}},
        {"do_normalize": False, "resample": 2},
        {"do_rescale": False, "do_resize": False},
        {"size": 224, "crop_size": 224, "image_mean": 0.5, "image_std": 0.5},
    ],
)
def test_parity_for_other_clip_settings(overrides):
    config = {**CLIP_CONFIG, **overrides}
    reference = _reference(config)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))
    for size in [(50, 70), (400, 300)]:
        image = _random_image(*size)
        expected = _reference_pixels(reference, image)
        got = ours.preprocess(image).pixel_values
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max())


def test_config_parsing_forms():
    clip = ImageProcessorConfig.from_dict(CLIP_CONFIG)
    assert (clip.shortest_edge, clip.crop_size, clip.resample) == (336, (336, 336), 3)
    assert clip.image_grid_pinpoints is None and not clip.is_anyres
    assert clip.processor_class == "CLIPImageProcessor"
    square = ImageProcessorConfig.from_dict({**CLIP_CONFIG, "size": {"height": 336, "width": 300}})
    assert (square.shortest_edge, square.resize_size) == (None, (336, 300))
    assert ImageProcessorConfig.from_dict({**CLIP_CONFIG, "crop_size": 224}).crop_size == (224, 224)
    fast = ImageProcessorConfig.from_dict(
        {**NEXT_CONFIG, "image_processor_type": "LlavaNextImageProcessorFast"}
    )
    assert fast.processor_class == "LlavaNextImageProcessor"
    assert fast.image_grid_pinpoints == tuple(tuple(p) for p in PINPOINTS)
    assert fast.tile_size == 336 and fast.is_anyres
    with pytest.raises(ValueError, match="SiglipImageProcessor"):
        ImageProcessorConfig.from_dict(
            {**CLIP_CONFIG, "image_processor_type": "SiglipImageProcessor"}
        )


def test_from_model_dir_reads_either_file(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "preprocessor_config.json").write_text(json.dumps(NEXT_CONFIG))
    assert ImageProcessorConfig.from_model_dir(old).is_anyres
    new = tmp_path / "new"
    new.mkdir()
    nested = {"image_processor": CLIP_CONFIG, "patch_size": 14}
    (new / "processor_config.json").write_text(json.dumps(nested))
    assert ImageProcessorConfig.from_model_dir(new) == ImageProcessorConfig.from_dict(CLIP_CONFIG)
    with pytest.raises(ValueError, match="empty_dir"):
        ImageProcessorConfig.from_model_dir(tmp_path / "empty_dir")
