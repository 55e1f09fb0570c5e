"""Image preprocessing for LLaVA 1.5 (CLIPImageProcessor) and LLaVA-NeXT
(LlavaNextImageProcessor), pixel-for-pixel equal to transformers' processors and faster.

What transformers does, and what we keep of it::

    any PIL mode --convert_to_rgb--> RGB      same PIL calls (alpha composited onto white)
    RGB --PIL resize--> uint8 --center crop    same PIL resize, so the same uint8 pixels
    uint8 --float64 rescale--> --normalize-->  x * (r / std) + (-mean / std) in float32,
                                               straight from uint8 (differs by < 1e-6)

The speed comes from what we drop: transformers converts every image PIL -> numpy CHW -> PIL
again before each resize (several full-resolution copies), rescales in float64 and, for
LLaVA-NeXT, re-resizes and re-normalises each 336x336 tile separately.

One case needs more than PIL: a shortest-edge resize of a very thin image (say 1x500) asks PIL
for a 336x168000 image only to crop 336x336 out of it (and 1x100000 would need gigabytes).
There we compute just the cropped window, with a numpy copy of Pillow's own fixed-point
resampling arithmetic (``_pil_weights``), which gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from caldera.worker.models.image_tokens import select_best_resolution

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# transformers' LlavaNextImageProcessor class default, used when a config names the class
# but omits the pinpoints.
DEFAULT_GRID_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))

_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad")
_CLIP_CLASS = "CLIPImageProcessor"
_NEXT_CLASS = "LlavaNextImageProcessor"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The image half of a checkpoint's preprocessor_config.json.

    Defaults are transformers' class defaults, so a key missing from the file means what it
    means to transformers. ``image_grid_pinpoints`` is None for CLIPImageProcessor (LLaVA 1.5)
    and a tuple of (height, width) resolutions for LlavaNextImageProcessor (anyres).
    """

    processor_class: str = _CLIP_CLASS
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    shortest_edge: int | None = 224
    resize_size: tuple[int, int] | None = None  # (height, width) when `size` names both
    crop_size: tuple[int, int] = (224, 224)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    do_pad: bool = False
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std must have 3 values (R, G, B)")
        if any(s == 0 for s in self.image_std):
            raise ValueError(f"image_std must not contain 0, got {self.image_std}")
        if (self.shortest_edge is None) == (self.resize_size is None):
            raise ValueError("exactly one of shortest_edge and resize_size must be set")
        sides = [*self.crop_size, *(self.resize_size or ()), self.shortest_edge or 1]
        if any(side <= 0 for side in sides):
            raise ValueError("image sizes in the processor config must be positive")
        if self.image_grid_pinpoints is not None and not self.image_grid_pinpoints:
            raise ValueError("image_grid_pinpoints must not be empty")
        try:
            PIL.Image.Resampling(self.resample)
        except ValueError:
            raise ValueError(f"unknown PIL resample filter {self.resample}") from None

    @property
    def is_anyres(self) -> bool:
        """True for LLaVA-NeXT: a base tile plus a grid of tiles per image."""
        return self.image_grid_pinpoints is not None

    @property
    def tile_size(self) -> int:
        """Side of one square tile fed to the vision tower (transformers' NeXT patch_size)."""
        return self.crop_size[0]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageProcessorConfig:
        """Parse a preprocessor_config.json dict (either ``size`` form, int or dict crop_size)."""
        processor_class = _normalise_class(d)
        kwargs: dict[str, Any] = {"processor_class": processor_class}
        for key in _FLAGS:
            if d.get(key) is not None:
                kwargs[key] = bool(d[key])
        if processor_class == _NEXT_CLASS and d.get("do_pad") is None:
            kwargs["do_pad"] = True
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                value = d[key]
                kwargs[key] = tuple(
                    float(v) for v in (value if isinstance(value, list) else [value] * 3)
                )
        if d.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(d["rescale_factor"])
        if d.get("resample") is not None:
            kwargs["resample"] = int(d["resample"])
        if d.get("size") is not None:
            kwargs["shortest_edge"], kwargs["resize_size"] = _parse_size(d["size"])
        if d.get("crop_size") is not None:
            kwargs["crop_size"] = _parse_crop_size(d["crop_size"])
        if processor_class == _NEXT_CLASS:
            pinpoints = d.get("image_grid_pinpoints") or DEFAULT_GRID_PINPOINTS
            kwargs["image_grid_pinpoints"] = tuple((int(h), int(w)) for h, w in pinpoints)
        return cls(**kwargs)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ImageProcessorConfig:
        """Read ``preprocessor_config.json``, or the ``image_processor`` entry of
        ``processor_config.json`` that newer transformers versions write."""
        folder = Path(path)
        preprocessor = folder / "preprocessor_config.json"
        if preprocessor.is_file():
            return cls.from_dict(json.loads(preprocessor.read_text()))
        processor = folder / "processor_config.json"
        if processor.is_file():
            nested = json.loads(processor.read_text()).get("image_processor")
            if isinstance(nested, dict):
                return cls.from_dict(nested)
        raise ValueError(
            f"no image processor config in {folder}: expected preprocessor_config.json, or "
            "processor_config.json with an 'image_processor' entry"
        )


def _normalise_class(d: Mapping[str, Any]) -> str:
    name = d.get("image_processor_type")
    if name is None:  # very old files: infer the class from what only anyres configs have
        return _NEXT_CLASS if d.get("image_grid_pinpoints") else _CLIP_CLASS
    for suffix in ("Fast", "Pil"):
        name = name.removesuffix(suffix)
    if name not in (_CLIP_CLASS, _NEXT_CLASS):
        raise ValueError(
            f"unsupported image processor {name!r}: Caldera implements {_CLIP_CLASS} "
            f"(LLaVA 1.5) and {_NEXT_CLASS} (LLaVA-NeXT)"
        )
    return name


def _parse_size(size: Any) -> tuple[int | None, tuple[int, int] | None]:
    """(shortest_edge, resize_size) from a ``size`` entry, read as transformers'
    get_size_dict(default_to_square=False) reads it."""
    if isinstance(size, int):
        return size, None
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return None, (int(size[0]), int(size[1]))
    if isinstance(size, Mapping):
        if size.get("longest_edge") is not None:
            raise ValueError("size.longest_edge is not supported by CLIP/LLaVA-NeXT processors")
        if size.get("shortest_edge") is not None:
            return int(size["shortest_edge"]), None
        if size.get("height") is not None and size.get("width") is not None:
            return None, (int(size["height"]), int(size["width"]))
    raise ValueError(f"cannot read image processor size {size!r}")


def _parse_crop_size(crop: Any) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if isinstance(crop, (list, tuple)) and len(crop) == 2:
        return int(crop[0]), int(crop[1])
    if isinstance(crop, Mapping) and crop.get("height") is not None and crop.get("width"):
        return int(crop["height"]), int(crop["width"])
    raise ValueError(f"cannot read image processor crop_size {crop!r}")


# --------------------------------------------------------------------------------------------
# Mode conversion
# --------------------------------------------------------------------------------------------


def convert_to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB exactly as transformers' ``convert_to_rgb`` makes it: images with an alpha band or
    a ``transparency`` entry are composited onto white, others go through ``convert("RGB")``.

    Returns the image itself when it is already plain RGB (transformers copies it).
    """
    if image.mode == "La":
        # Premultiplied L+alpha has no direct route to RGB(A) in Pillow (transformers raises);
        # un-premultiplying to LA first keeps the same meaning.
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------
# Resize + center crop (uint8, HWC)
# --------------------------------------------------------------------------------------------


def shortest_edge_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(height, width) after scaling the shorter side to ``shortest_edge`` (transformers'
    get_resize_output_image_size with default_to_square=False)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(array: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """transformers' center_crop on an HWC array: a slice, or zero padding where the image is
    smaller than the crop."""
    height, width = array.shape[:2]
    crop_h, crop_w = crop_hw
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    if top >= 0 and left >= 0:
        return array[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, height), max(crop_w, width)
    padded = np.zeros((new_h, new_w, *array.shape[2:]), dtype=array.dtype)
    pad_top, pad_left = math.ceil((new_h - height) / 2), math.ceil((new_w - width) / 2)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = array
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def resize_and_crop(
    image: PIL.Image.Image,
    size_hw: tuple[int, int],
    crop_hw: tuple[int, int] | None,
    resample: int,
) -> np.ndarray:
    """``image`` (RGB) resized to ``size_hw`` with PIL, then center-cropped to ``crop_hw``:
    uint8 HWC, byte-equal to a full PIL resize followed by the crop."""
    new_h, new_w = size_hw
    if crop_hw is not None and _worth_windowing(image, size_hw, crop_hw, resample):
        return _resize_window(image, size_hw, crop_hw, resample)
    resized = image if image.size == (new_w, new_h) else image.resize((new_w, new_h), resample)
    array = np.array(resized)
    return center_crop(array, crop_hw) if crop_hw is not None else array


def _worth_windowing(
    image: PIL.Image.Image, size_hw: tuple[int, int], crop_hw: tuple[int, int], resample: int
) -> bool:
    """Compute only the crop when the full resize would be much larger than it: thin images
    blown up by a shortest-edge resize.

    Only for upscales (a downscaled output is never larger than the input): Pillow always
    resizes horizontally first there, while for strong vertical downscales newer versions
    go vertically first, an order we would have to mirror."""
    (in_w, in_h), (new_h, new_w), (crop_h, crop_w) = image.size, size_hw, crop_hw
    upscale = in_h <= new_h and in_w <= new_w
    fits = crop_h <= new_h and crop_w <= new_w
    blown_up = new_h * new_w > 4 * crop_h * crop_w
    return upscale and fits and blown_up and resample in _PIL_FILTERS


def _resize_window(
    image: PIL.Image.Image, size_hw: tuple[int, int], crop_hw: tuple[int, int], resample: int
) -> np.ndarray:
    """The ``crop_hw`` center window of an upscaling PIL resize to ``size_hw``, without the
    rest.

    Pillow upscales horizontally, then vertically, rounding to uint8 in between; each pass
    is independent per row (resp. column), so rows and columns outside the window can be
    dropped between passes. An axis longer than the crop is resampled only over the window
    with ``_pil_weights``; other axes are cheap and PIL does them whole.
    """
    (in_w, in_h), (new_h, new_w), (crop_h, crop_w) = image.size, size_hw, crop_hw
    top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
    window_v = in_h < new_h and crop_h < new_h
    window_h = in_w < new_w and crop_w < new_w

    rows: tuple[int, int] = (0, in_h)
    if window_v:  # only the input rows that the kept output rows read
        starts, counts, weights_v = _pil_weights(in_h, new_h, top, top + crop_h, resample)
        rows = (int(starts.min()), int((starts + counts).max()))
    region = image if rows == (0, in_h) else image.crop((0, rows[0], in_w, rows[1]))

    # Horizontal pass (first, as in Pillow), keeping the window's columns.
    if new_w == in_w:
        horizontal = np.array(region)[:, left : left + crop_w]
    elif window_h:
        starts_h, _, weights_h = _pil_weights(in_w, new_w, left, left + crop_w, resample)
        horizontal = _apply_weights(np.array(region), 1, starts_h, weights_h)
    else:  # the window is the whole width
        horizontal = np.array(region.resize((new_w, region.height), resample))

    # Vertical pass, keeping the window's rows.
    if new_h == in_h:
        return horizontal[top : top + crop_h]
    if window_v:
        return _apply_weights(horizontal, 0, starts - rows[0], weights_v)
    columns = PIL.Image.fromarray(np.ascontiguousarray(horizontal), "RGB")
    return np.array(columns.resize((crop_w, new_h), resample))  # the window is the height


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _bilinear(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _box(x: np.ndarray) -> np.ndarray:
    return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)


# Pillow's filters (Resample.c) whose arithmetic numpy reproduces bit for bit; LANCZOS and
# HAMMING call libm sin/cos, which need not round as numpy does, so they always go to PIL.
_PIL_FILTERS: dict[int, tuple[Callable[[np.ndarray], np.ndarray], float]] = {
    int(PIL.Image.Resampling.BICUBIC): (_bicubic, 2.0),
    int(PIL.Image.Resampling.BILINEAR): (_bilinear, 1.0),
    int(PIL.Image.Resampling.BOX): (_box, 0.5),
}
_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point weights for 8-bit images


def _pil_weights(
    in_size: int, out_size: int, start: int, stop: int, resample: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for output indices
    [start, stop) of a whole-image ``in_size -> out_size`` pass: (first input index [n],
    tap count [n], int64 fixed-point weights [n, ksize]). Same operations in the same order
    as the C code, so the same doubles and the same rounded integers."""
    filter_fn, filter_support = _PIL_FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = filter_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(start, stop, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5), in_size).astype(np.int64) - first
    taps = np.arange(ksize)
    inside = taps[None, :] < count[:, None]
    offsets = (taps[None, :] + first[:, None]).astype(np.float64)
    weights = np.where(
        inside, filter_fn((offsets - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0
    )
    total = np.cumsum(weights, axis=1)[:, -1:]  # sequential, like the C loop's `ww += w`
    weights = np.divide(weights, total, out=weights, where=total != 0.0)
    scaled = weights * float(1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)
    return first, count, fixed


def _apply_weights(
    array: np.ndarray, axis: int, first: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """One Pillow 8-bit resampling pass along ``axis`` (0: rows, 1: columns) of an HWC uint8
    array, for the output indices whose weights are given."""
    taps = np.minimum(first[:, None] + np.arange(weights.shape[1]), array.shape[axis] - 1)
    gathered = np.take(array, taps, axis=axis).astype(np.int64)  # taps past `count` weigh 0
    shape = [1] * gathered.ndim
    shape[axis], shape[axis + 1] = weights.shape
    total = (gathered * weights.reshape(shape)).sum(axis=axis + 1) + (1 << (_PRECISION_BITS - 1))
    return np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------


@dataclass
class ProcessedImage:
    """One image ready for the vision tower.

    ``pixel_values``: float32 [num_tiles, 3, H, W]; one tile for LLaVA 1.5, the base tile
    then the grid tiles row by row for LLaVA-NeXT (transformers' order).
    ``image_size``: the original (height, width), which anyres unpadding needs.
    ``base_only``: a LLaVA-NeXT image at low detail, the base tile alone (no grid tiles);
    the model then encodes it as that one tile, without image_newline.
    """

    pixel_values: torch.Tensor
    image_size: tuple[int, int]
    base_only: bool = False

    @property
    def num_tiles(self) -> int:
        return self.pixel_values.shape[0]

    def content_hash(self) -> str:
        """sha256 hex of everything the vision tower and the placeholder count see: the tiles'
        pixel values, the original size and the detail. Equal hashes encode to equal embeddings,
        so the prefix cache and the encoder cache share work between requests whatever the
        image's source or file format; hashing the preprocessed tiles (1.4 MB for LLaVA 1.5)
        costs a fraction of hashing the decoded picture (18 MB for a 3000x2000 photo)."""
        pixels = self.pixel_values.contiguous().numpy()
        digest = hashlib.sha256()
        digest.update(f"{tuple(pixels.shape)}:{self.image_size}:{self.base_only}:".encode())
        digest.update(memoryview(pixels).cast("B"))
        return digest.hexdigest()


class ImageProcessor:
    """Turns a PIL image into normalised tiles, as the checkpoint's transformers processor
    would (max abs difference ~1e-6), for CLIPImageProcessor and LlavaNextImageProcessor."""

    def __init__(self, config: ImageProcessorConfig) -> None:
        self.config = config
        scale = config.rescale_factor if config.do_rescale else 1.0
        mean = np.asarray(config.image_mean, dtype=np.float32).astype(np.float64)
        std = np.asarray(config.image_std, dtype=np.float32).astype(np.float64)
        if not config.do_normalize:
            mean, std = np.zeros(3), np.ones(3)
        # pixel * a + b == (pixel * scale - mean) / std, folded into one multiply-add.
        self._a = (scale / std).astype(np.float32).reshape(3, 1, 1)
        self._b = (-mean / std).astype(np.float32).reshape(3, 1, 1)

    def preprocess(self, image: PIL.Image.Image, base_only: bool = False) -> ProcessedImage:
        """Convert, resize, crop (and for anyres tile) and normalise one image.

        ``base_only`` (low detail) keeps just the anyres base tile, the same pixels as the
        first tile of the full result; LLaVA 1.5 has only that tile anyway and ignores it."""
        width, height = image.size
        rgb = convert_to_rgb(image)
        base_only = base_only and self.config.is_anyres
        if base_only:
            tiles = [self._finish_tile(self._base_tile(rgb))]
        elif self.config.is_anyres:
            tiles = self._anyres_tiles(rgb)
        else:
            tiles = [self._resize_crop(rgb)]
        shapes = {tile.shape for tile in tiles}
        if len(shapes) != 1:
            raise ValueError(f"processor config yields tiles of different shapes {shapes}")
        tile_h, tile_w = tiles[0].shape[:2]
        pixel_values = torch.empty((len(tiles), 3, tile_h, tile_w), dtype=torch.float32)
        for out, tile in zip(pixel_values.numpy(), tiles):
            self._normalise_into(out, tile)
        return ProcessedImage(
            pixel_values=pixel_values, image_size=(height, width), base_only=base_only
        )

    def _resize_target(self, height: int, width: int) -> tuple[int, int]:
        if self.config.resize_size is not None:
            return self.config.resize_size
        return shortest_edge_size(height, width, int(self.config.shortest_edge or 0))

    def _resize_crop(self, rgb: PIL.Image.Image) -> np.ndarray:
        """CLIPImageProcessor: resize (shortest edge or fixed size), then center crop."""
        cfg = self.config
        crop = cfg.crop_size if cfg.do_center_crop else None
        if cfg.do_resize:
            target = self._resize_target(rgb.height, rgb.width)
            return resize_and_crop(rgb, target, crop, cfg.resample)
        array = np.array(rgb)
        return center_crop(array, crop) if crop is not None else array

    def _anyres_tiles(self, rgb: PIL.Image.Image) -> list[np.ndarray]:
        """LlavaNextImageProcessor: the whole image squeezed to the base size, then the image
        fitted (aspect kept, zero padded, centred) into the best pinpoint, cut into tiles."""
        cfg = self.config
        assert cfg.image_grid_pinpoints is not None
        tile = cfg.tile_size
        best_h, best_w = select_best_resolution((rgb.height, rgb.width), cfg.image_grid_pinpoints)
        fit_h, fit_w = _fit_size(rgb.height, rgb.width, best_h, best_w)
        canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)
        top, left = (best_h - fit_h) // 2, (best_w - fit_w) // 2
        canvas[top : top + fit_h, left : left + fit_w] = resize_and_crop(
            rgb, (fit_h, fit_w), None, cfg.resample
        )
        tiles = [self._base_tile(rgb)]
        tiles += [
            canvas[y : y + tile, x : x + tile]
            for y in range(0, best_h, tile)
            for x in range(0, best_w, tile)
        ]
        return [self._finish_tile(t) for t in tiles]

    def _base_tile(self, rgb: PIL.Image.Image) -> np.ndarray:
        """The whole image squeezed (aspect not kept) to the anyres base size."""
        cfg = self.config
        base_hw = cfg.resize_size or (int(cfg.shortest_edge or 0),) * 2
        return resize_and_crop(rgb, base_hw, None, cfg.resample)

    def _finish_tile(self, tile: np.ndarray) -> np.ndarray:
        """The per-tile resize + crop transformers applies to every anyres tile; a no-op for
        the real checkpoints' settings (336 tiles, shortest_edge 336, crop 336)."""
        cfg = self.config
        if cfg.do_resize:
            target = self._resize_target(*tile.shape[:2])
            if target != tile.shape[:2]:
                image = PIL.Image.fromarray(np.ascontiguousarray(tile), "RGB")
                tile = resize_and_crop(image, target, None, cfg.resample)
        if cfg.do_center_crop and tuple(tile.shape[:2]) != cfg.crop_size:
            tile = center_crop(tile, cfg.crop_size)
        return tile

    def _normalise_into(self, out: np.ndarray, tile: np.ndarray) -> None:
        """out[3, H, W] = tile * a + b, straight from the uint8 HWC pixels, in float32.

        numpy rather than torch on purpose: torch spreads these sub-millisecond ops over
        its OpenMP threads, and on a busy host (the API process shares its cores with
        tokenization and the event loop) that made them 10-50x slower."""
        np.multiply(tile.transpose(2, 0, 1), self._a, out=out)
        np.add(out, self._b, out=out)


def _fit_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size that fits (height, width) into the target keeping the aspect ratio (transformers'
    get_patch_output_size, ceil included)."""
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)
