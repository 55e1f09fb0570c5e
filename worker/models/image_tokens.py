"""How many placeholder tokens an image becomes: the one function the processor, the
scheduler and the model all use, so the three can never disagree. Pure Python.

LLaVA 1.5: every image is one ``image_size`` tile -> (image_size / patch)^2 features.

LLaVA-NeXT ("anyres"): the image is fitted into the best resolution of
``image_grid_pinpoints`` and cut into a grid of tiles; the features are::

    base tile (whole image at image_size)      side * side
    grid tiles, stitched, unpadded to the      rows * cols, where the padded grid of
    original aspect ratio                      (grid_h * side) x (grid_w * side) features is
                                               cropped back to the image's aspect ratio
    one image_newline per stitched row         rows

A LLaVA-NeXT image asked for at low detail (``base_only``) is just the base tile, as one
LLaVA 1.5 image is: no grid, no image_newline.
"""

from __future__ import annotations

from collections.abc import Sequence


def select_best_resolution(
    original_size: tuple[int, int], possible_resolutions: Sequence[Sequence[int]]
) -> tuple[int, int]:
    """The (height, width) pinpoint that keeps the most of the image and wastes the least."""
    original_height, original_width = original_size
    best_fit: tuple[int, int] | None = None
    max_effective = 0
    min_wasted = float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (int(height), int(width))
    assert best_fit is not None, "image_grid_pinpoints is empty"
    return best_fit


def anyres_grid_shape(
    image_size: tuple[int, int], pinpoints: Sequence[Sequence[int]], tile_size: int
) -> tuple[int, int]:
    """(rows, cols) of tiles for an image of (height, width)."""
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile_size, width // tile_size


def unpadded_features_shape(
    original_size: tuple[int, int], current_height: int, current_width: int
) -> tuple[int, int, int, int]:
    """Crop of a (current_height x current_width) feature grid back to the original aspect
    ratio. Returns (top, bottom, left, right) bounds, half-open."""
    original_height, original_width = original_size
    if original_width / original_height > current_width / current_height:
        new_height = int(round(original_height * (current_width / original_width), 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    new_width = int(round(original_width * (current_height / original_height), 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def num_image_tokens(
    image_size: tuple[int, int],
    *,
    tile_size: int,
    patch_size: int,
    image_grid_pinpoints: Sequence[Sequence[int]] | None,
    keep_cls: bool = False,
    base_only: bool = False,
) -> int:
    """Number of ``<image>`` tokens for an image of (height, width).

    ``image_grid_pinpoints`` None means LLaVA 1.5 (one tile); ``keep_cls`` is the "full"
    feature-select strategy, which keeps the CLS feature of each tile; ``base_only`` counts
    only the base tile of an anyres image (low detail).
    """
    side = tile_size // patch_size
    per_tile = side * side + (1 if keep_cls else 0)
    if image_grid_pinpoints is None or base_only:
        return per_tile
    rows, cols = anyres_grid_shape(image_size, image_grid_pinpoints, tile_size)
    top, bottom, left, right = unpadded_features_shape(image_size, rows * side, cols * side)
    stitched_rows, stitched_cols = bottom - top, right - left
    return per_tile + stitched_rows * stitched_cols + stitched_rows
