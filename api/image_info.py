"""What the model saw of each image: the geometry behind the ``caldera`` response extension.

A request that sets ``"caldera_details": true`` gets, in its response (or in the last streamed
chunk that carries a ``finish_reason``), ``"caldera": {"images": [describe_image(...), ...]}``,
one object per image in prompt order. The web page draws from it the image as the vision tower
received it; docs/web-ui.md documents the fields. Every number is the one the preprocessing
used (engine/image_processing.py), recomputed from the same functions::

    LLaVA 1.5           original --resize (shortest edge)--> resized --center crop--> tile
    LLaVA-NeXT, base    original --squeeze (aspect not kept)--> base (one tile)
    LLaVA-NeXT, grid    original --fit (aspect kept)--> resized, zero padded, centred in the
                        canvas (the best pinpoint) --cut--> rows x cols tiles of tile_size
"""

from __future__ import annotations

import math
from typing import Any

from caldera.engine.image_processing import (
    ImageProcessorConfig,
    ProcessedImage,
    _fit_size,
    shortest_edge_size,
)
from caldera.worker.models.image_tokens import select_best_resolution


def describe_image(
    processed: ProcessedImage, num_tokens: int, processor_config: ImageProcessorConfig
) -> dict[str, Any]:
    """A JSON-able description of one preprocessed image (sizes in pixels, ``{"width",
    "height"}`` objects): ``original``, ``image_tokens``, ``detail``, ``tile`` (the size of
    each tile fed to the vision tower), ``base`` (the whole-image view) and ``grid`` (the
    anyres tiling, None for LLaVA 1.5 and for low-detail images)."""
    height, width = processed.image_size
    tile_h, tile_w = (int(side) for side in processed.pixel_values.shape[-2:])
    cfg = processor_config
    # An anyres result always has the base tile plus at least one grid tile, so a single tile
    # means the base alone, whether or not this ProcessedImage carries the flag.
    base_only = cfg.is_anyres and (
        bool(getattr(processed, "base_only", False)) or processed.num_tiles == 1
    )
    return {
        "original": _size(height, width),
        "image_tokens": int(num_tokens),
        "detail": "low" if base_only else "high",
        "tile": _size(tile_h, tile_w),
        "base": _anyres_base(cfg) if cfg.is_anyres else _clip_view(cfg, height, width),
        "grid": _anyres_grid(cfg, height, width) if cfg.is_anyres and not base_only else None,
    }


def _size(height: int, width: int) -> dict[str, int]:
    return {"width": int(width), "height": int(height)}


def _clip_view(cfg: ImageProcessorConfig, height: int, width: int) -> dict[str, Any]:
    """LLaVA 1.5: ``resized`` is the image after the resize, ``crop`` the window of it the
    tile shows (top/left may be negative, where the crop is larger and zero padded)."""
    resized_h, resized_w = height, width
    if cfg.do_resize:
        resized_h, resized_w = cfg.resize_size or shortest_edge_size(
            height, width, int(cfg.shortest_edge or 0)
        )
    crop_h, crop_w = cfg.crop_size if cfg.do_center_crop else (resized_h, resized_w)
    return {
        "mode": "crop",
        "resized": _size(resized_h, resized_w),
        "crop": {
            "top": (resized_h - crop_h) // 2,
            "left": (resized_w - crop_w) // 2,
            **_size(crop_h, crop_w),
        },
    }


def _anyres_base(cfg: ImageProcessorConfig) -> dict[str, Any]:
    """LLaVA-NeXT's base view: the whole image squeezed to the base size."""
    base_h, base_w = cfg.resize_size or (int(cfg.shortest_edge or 0),) * 2
    return {"mode": "squeeze", "resized": _size(base_h, base_w), "crop": None}


def _anyres_grid(cfg: ImageProcessorConfig, height: int, width: int) -> dict[str, Any]:
    assert cfg.image_grid_pinpoints is not None
    tile = cfg.tile_size
    canvas_h, canvas_w = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    fit_h, fit_w = _fit_size(height, width, canvas_h, canvas_w)
    top, left = (canvas_h - fit_h) // 2, (canvas_w - fit_w) // 2
    return {
        "canvas": _size(canvas_h, canvas_w),
        "resized": _size(fit_h, fit_w),
        "padding": {
            "top": top,
            "left": left,
            "bottom": canvas_h - fit_h - top,
            "right": canvas_w - fit_w - left,
        },
        "tile_size": tile,
        # The tiles are cut every tile_size pixels (a last partial tile would still be cut).
        "rows": math.ceil(canvas_h / tile),
        "cols": math.ceil(canvas_w / tile),
    }
