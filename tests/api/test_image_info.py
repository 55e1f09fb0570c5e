"""describe_image: the geometry it reports is the one the preprocessing used, checked on the
pixels the tiny checkpoints' processors produce."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from caldera.api.image_info import describe_image
from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig, ProcessedImage
from caldera.worker.config import ModelConfig


def _white(height: int, width: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), (255, 255, 255))


def _normalised(processor: ImageProcessor, value: int) -> np.ndarray:
    """What a uint8 pixel of ``value`` becomes in pixel_values, per channel [3, 1, 1]."""
    return value * processor._a + processor._b


def _stitch(processed: ProcessedImage, rows: int, cols: int) -> np.ndarray:
    """The grid tiles (after the base tile) put back together: [3, rows * T, cols * T]."""
    tiles = processed.pixel_values[1:].numpy()
    assert tiles.shape[0] == rows * cols
    return np.concatenate(
        [np.concatenate(list(tiles[r * cols : (r + 1) * cols]), axis=2) for r in range(rows)],
        axis=1,
    )


@pytest.mark.parametrize("shape", ["llava-next-mistral", "llava-next-vicuna"])
@pytest.mark.parametrize(
    ("height", "width", "canvas", "resized", "grid"),
    [
        (300, 500, (336, 672), (336, 560), (1, 2)),  # wide: padded left and right
        # tall: padded top and bottom; 700 * (336 / 300) is 784.0000000000001, ceiled as
        # transformers does
        (700, 300, (1008, 336), (785, 336), (3, 1)),
        (640, 640, (672, 672), (672, 672), (2, 2)),  # square: no padding
    ],
)
def test_anyres_geometry_matches_the_tiles(
    tiny_checkpoint, shape, height, width, canvas, resized, grid
) -> None:
    folder = tiny_checkpoint(shape)
    cfg = ImageProcessorConfig.from_model_dir(folder)
    processor = ImageProcessor(cfg)
    processed = processor.preprocess(_white(height, width))
    tokens = ModelConfig.from_model_dir(folder).num_image_tokens((height, width))

    info = describe_image(processed, tokens, cfg)

    json.dumps(info)  # plain JSON
    assert info["original"] == {"width": width, "height": height}
    assert info["image_tokens"] == tokens
    assert info["detail"] == "high"
    assert info["tile"] == {"width": 336, "height": 336}
    assert info["base"] == {"mode": "squeeze", "resized": {"width": 336, "height": 336},
                            "crop": None}
    g = info["grid"]
    assert (g["canvas"]["height"], g["canvas"]["width"]) == canvas
    assert (g["resized"]["height"], g["resized"]["width"]) == resized
    assert (g["rows"], g["cols"]) == grid
    assert g["tile_size"] == 336
    pad = g["padding"]
    assert pad["top"] + resized[0] + pad["bottom"] == canvas[0]
    assert pad["left"] + resized[1] + pad["right"] == canvas[1]
    assert processed.num_tiles == 1 + grid[0] * grid[1]

    # The white image lies exactly where the description puts it; the rest is zero padding.
    stitched = _stitch(processed, *grid)
    inside = np.zeros(canvas, dtype=bool)
    inside[pad["top"] : pad["top"] + resized[0], pad["left"] : pad["left"] + resized[1]] = True
    white, black = _normalised(processor, 255), _normalised(processor, 0)
    np.testing.assert_allclose(stitched[:, inside], np.broadcast_to(white[:, 0], (3, inside.sum())),
                               atol=1e-5)
    np.testing.assert_allclose(stitched[:, ~inside],
                               np.broadcast_to(black[:, 0], (3, (~inside).sum())), atol=1e-5)


def test_low_detail_is_the_base_view_alone(next_mistral_dir) -> None:
    cfg = ImageProcessorConfig.from_model_dir(next_mistral_dir)
    full = ImageProcessor(cfg).preprocess(_white(300, 500))
    # Only the base tile, as a low-detail request gets it (flag or not, one tile means base).
    base = ProcessedImage(pixel_values=full.pixel_values[:1], image_size=full.image_size)

    info = describe_image(base, 576, cfg)

    assert info["detail"] == "low"
    assert info["grid"] is None
    assert info["base"]["mode"] == "squeeze"
    assert info["image_tokens"] == 576


def test_llava15_reports_the_center_crop(llava15_dir) -> None:
    cfg = ImageProcessorConfig.from_model_dir(llava15_dir)
    processor = ImageProcessor(cfg)
    # Left 60% black, right 40% white: the crop's columns show where the edge fell.
    height, width = 300, 500
    pixels = np.full((height, width, 3), 255, dtype=np.uint8)
    pixels[:, :300] = 0
    processed = processor.preprocess(PIL.Image.fromarray(pixels, "RGB"))
    tokens = ModelConfig.from_model_dir(llava15_dir).num_image_tokens((height, width))

    info = describe_image(processed, tokens, cfg)

    assert info["grid"] is None
    assert info["detail"] == "high"
    assert info["image_tokens"] == tokens == 576
    assert info["base"] == {
        "mode": "crop",
        "resized": {"width": 560, "height": 336},
        "crop": {"top": 0, "left": 112, "width": 336, "height": 336},
    }
    # The edge sits at resized column 336 (300 * 560 / 500), i.e. crop column 336 - 112.
    row = processed.pixel_values[0, 0, 168].numpy()
    black, white = _normalised(processor, 0)[0, 0, 0], _normalised(processor, 255)[0, 0, 0]
    edge = 336 - info["base"]["crop"]["left"]
    np.testing.assert_allclose(row[: edge - 3], black, atol=1e-5)
    np.testing.assert_allclose(row[edge + 3 :], white, atol=1e-5)
