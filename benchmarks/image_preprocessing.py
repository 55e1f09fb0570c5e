"""Image preprocessing: Caldera's ImageProcessor against transformers' processors.

Times both on the same decoded images (a mix of sizes) with the llava-hf checkpoints'
settings, for CLIPImageProcessor (LLaVA 1.5) and LlavaNextImageProcessor (LLaVA-NeXT), and
checks that the pixel values agree. transformers is needed (``pip install caldera[demo]``).

    python -m caldera.benchmarks.image_preprocessing --repeats 10
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import PIL.Image
import torch

from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig

PROCESSOR_CONFIGS = {
    "clip": {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336},
        "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 1 / 255,
    },
}
PROCESSOR_CONFIGS["next"] = {
    **PROCESSOR_CONFIGS["clip"],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
}
# (height, width, mode): thumbnails to 12 MP photos, both orientations, one with alpha.
DEFAULT_IMAGES = (
    "336x336,480x640,640x480,768x1024,1080x1920,1536x2048,3000x4000,4000x3000,512x512:RGBA"
)


@dataclass
class Row:
    label: str
    reference_ms: float
    ours_ms: float
    max_abs_diff: float


def parse_images(spec: str, seed: int) -> list[tuple[str, PIL.Image.Image]]:
    """'HxW[:MODE],...' -> labelled random images (resizing cost does not depend on content)."""
    rng = np.random.default_rng(seed)
    images = []
    for item in spec.split(","):
        size, _, mode = item.strip().partition(":")
        height, width = (int(v) for v in size.lower().split("x"))
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        image = PIL.Image.fromarray(pixels, "RGBA").convert(mode or "RGB")
        images.append((f"{height}x{width} {image.mode}", image))
    return images


def reference_processor(config: dict):
    """transformers' processor as users without torchvision get it (the PIL backend)."""
    import transformers

    transformers.logging.set_verbosity_error()
    kwargs = {k: v for k, v in config.items() if k != "image_processor_type"}
    if "image_grid_pinpoints" in config:
        return transformers.LlavaNextImageProcessor(**kwargs)
    return transformers.CLIPImageProcessor(**kwargs)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_processor(name: str, images, repeats: int, warmup: int) -> list[Row]:
    config = PROCESSOR_CONFIGS[name]
    reference = reference_processor(config)
    ours = ImageProcessor(ImageProcessorConfig.from_dict(config))
    rows = []
    for label, image in images:
        expected = reference(image, return_tensors="pt")["pixel_values"][0]
        got = ours.preprocess(image).pixel_values
        diff = (got - (expected if expected.ndim == 4 else expected[None])).abs().max().item()
        reference_ms = median_ms(partial(reference, image, return_tensors="pt"), repeats, warmup)
        ours_ms = median_ms(partial(ours.preprocess, image), repeats, warmup)
        rows.append(Row(label, reference_ms, ours_ms, diff))
    return rows


def print_table(name: str, rows: list[Row]) -> None:
    print(f"\n{PROCESSOR_CONFIGS[name]['image_processor_type']}: per-image median ms")
    print(f"{'image':<18}{'transformers':>14}{'caldera':>10}{'speedup':>9}{'max |diff|':>12}")
    for row in rows:
        speedup = row.reference_ms / row.ours_ms
        print(
            f"{row.label:<18}{row.reference_ms:>14.2f}{row.ours_ms:>10.2f}"
            f"{speedup:>8.1f}x{row.max_abs_diff:>12.1e}"
        )
    reference_mean = statistics.mean(r.reference_ms for r in rows)
    ours_mean = statistics.mean(r.ours_ms for r in rows)
    print(
        f"{'mean over mix':<18}{reference_mean:>14.2f}{ours_mean:>10.2f}"
        f"{reference_mean / ours_mean:>8.1f}x"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=DEFAULT_IMAGES, help="comma-separated HxW[:MODE]")
    parser.add_argument("--processors", default="clip,next", help="comma-separated: clip, next")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per image")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = parse_images(args.images, args.seed)
    print(f"torch threads: {torch.get_num_threads()}, repeats: {args.repeats}")
    for name in args.processors.split(","):
        print_table(name.strip(), bench_processor(name.strip(), images, args.repeats, args.warmup))


if __name__ == "__main__":
    main()
