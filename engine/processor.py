"""Prompt + images -> token ids with image placeholders, ready for the engine.

Each ``<image>`` marker in the prompt becomes exactly as many placeholder ids as the encoder
produces for that image (``ModelConfig.num_image_tokens``: the one count shared with the
scheduler and the model), and each image gets a hash of its preprocessed tiles, so identical
pictures share encoder output and prefix-cache blocks whatever their source.

An image's OpenAI ``detail`` picks how LLaVA-NeXT sees it: "low" is the base tile alone (the
whole image as one tile, as LLaVA 1.5 sees every image), "auto" and "high" the full anyres
grid. A low-detail image has its own tiles, so its own hash.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from caldera.engine.chat_template import IMAGE_DETAILS, ChatTemplate
from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig, ProcessedImage
from caldera.engine.media import load_image
from caldera.engine.tokenizer import Tokenizer
from caldera.scheduler.output import ImageFeature
from caldera.worker.config import ModelConfig


class PromptError(ValueError):
    """A prompt the engine cannot take; the message says what to change."""


@dataclass
class ProcessedPrompt:
    prompt: str
    token_ids: list[int]
    images: list[ImageFeature] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedImage:
    """One decoded image preprocessed for the vision tower, with its content hash."""

    processed: ProcessedImage
    identifier: str


def prepare_image(processor: ImageProcessor, image: Image.Image, base_only: bool) -> PreparedImage:
    """Preprocessing and the content hash of one image (of its preprocessed tiles: a
    low-detail image has other tiles, so another hash, than the same picture at full detail)."""
    processed = processor.preprocess(image, base_only=base_only)
    return PreparedImage(processed, processed.content_hash())


class InputProcessor:
    """Owns the tokenizer, chat template and image processor of one model."""

    def __init__(
        self,
        model_dir: str | Path,
        config: ModelConfig,
        *,
        chat_template: str | None = None,
        allowed_local_media_paths: Sequence[str] = (),
        allow_private_media_urls: bool = False,
    ) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.chat_template = ChatTemplate.from_model_dir(model_dir, chat_template)
        self.image_processor = ImageProcessor(ImageProcessorConfig.from_model_dir(model_dir))
        self.allowed_local_media_paths = tuple(allowed_local_media_paths)
        self.allow_private_media_urls = allow_private_media_urls
        self.image_token_id = config.image_token_index

    # ---- entry points -------------------------------------------------------------------

    def process(
        self, prompt: str, images: Sequence[Any] = (), details: Sequence[str] | None = None
    ) -> ProcessedPrompt:
        """A text prompt with one ``<image>`` per image (PIL images, paths, URLs, bytes);
        ``details``: one detail level per image (see :meth:`process_loaded`)."""
        self._check_details(details, len(images))
        pil_images = [self.load(source) for source in images]
        return self.process_loaded(prompt, pil_images, details)

    def process_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                     **template_kwargs: Any) -> ProcessedPrompt:
        """OpenAI-format messages through the chat template, images from their parts."""
        rendered = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        return self.process(rendered.text, rendered.image_sources, rendered.image_details)

    def load(self, source: Any) -> Image.Image:
        return load_image(source, allowed_local_paths=self.allowed_local_media_paths,
                          allow_private=self.allow_private_media_urls)

    # ---- pieces -------------------------------------------------------------------------

    def process_loaded(
        self,
        prompt: str,
        images: Sequence[Image.Image],
        details: Sequence[str] | None = None,
    ) -> ProcessedPrompt:
        """``details``: one of "auto", "low", "high" per image, in order (None: all "auto").
        "low" gives a LLaVA-NeXT image its base tile only; LLaVA 1.5 ignores it."""
        token_ids = self.tokenize(prompt, len(images), details)
        prepared = [prepare_image(self.image_processor, image, base_only)
                    for image, base_only in zip(images, self.base_only(details, len(images)))]
        return self.assemble(prompt, token_ids, prepared)

    def tokenize(self, prompt: str, num_images: int,
                 details: Sequence[str] | None = None) -> list[int]:
        """The prompt's token ids, one ``<image>`` marker per image checked (cheap: done
        before any image is fetched or decoded)."""
        self._check_details(details, num_images)
        token_ids = self.tokenizer.encode(prompt)
        markers = sum(1 for t in token_ids if t == self.image_token_id)
        if markers != num_images:
            raise PromptError(
                f"the prompt has {markers} <image> marker(s) but {num_images} image(s) "
                "were given: put one <image> in the text for each image"
            )
        return token_ids

    def base_only(self, details: Sequence[str] | None, num_images: int) -> list[bool]:
        """Per image: whether it is seen as its base tile alone (LLaVA-NeXT at low detail)."""
        if details is None or not self.config.is_next:
            return [False] * num_images
        return [detail == "low" for detail in details]

    def assemble(self, prompt: str, token_ids: Sequence[int],
                 prepared: Sequence[PreparedImage]) -> ProcessedPrompt:
        """Each marker of ``tokenize``'s ids expanded to its image's placeholder tokens."""
        expanded: list[int] = []
        features: list[ImageFeature] = []
        previous = 0
        markers = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        for marker, image in zip(markers, prepared, strict=True):
            processed = image.processed
            count = self.config.num_image_tokens(processed.image_size, processed.base_only)
            expanded.extend(token_ids[previous:marker])
            features.append(ImageFeature(identifier=image.identifier, offset=len(expanded),
                                         length=count, data=processed))
            expanded.extend([self.image_token_id] * count)
            previous = marker + 1
        expanded.extend(token_ids[previous:])
        return ProcessedPrompt(prompt=prompt, token_ids=expanded, images=features)

    @staticmethod
    def _check_details(details: Sequence[str] | None, num_images: int) -> None:
        if details is None:
            return
        if isinstance(details, str) or len(details) != num_images:
            raise PromptError(
                f"image details must be a list with one entry per image ({num_images}); got "
                f"{details!r}"
            )
        for detail in details:
            if detail not in IMAGE_DETAILS:
                raise PromptError(
                    f"image detail {detail!r} is not accepted; use one of "
                    f"{', '.join(map(repr, IMAGE_DETAILS))}"
                )
