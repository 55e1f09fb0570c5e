"""Prompt + images -> token ids with image placeholders, ready for the engine.

Each ``<image>`` marker in the prompt becomes exactly as many placeholder ids as the encoder
produces for that image (``ModelConfig.num_image_tokens``: the one count shared with the
scheduler and the model), and each image gets a content hash so identical pixels share encoder
output and prefix-cache blocks whatever their source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from caldera.engine.chat_template import ChatTemplate
from caldera.engine.image_processing import ImageProcessor, ImageProcessorConfig
from caldera.engine.media import image_content_hash, load_image
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


class InputProcessor:
    """Owns the tokenizer, chat template and image processor of one model."""

    def __init__(
        self,
        model_dir: str | Path,
        config: ModelConfig,
        *,
        chat_template: str | None = None,
        allowed_local_media_paths: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.tokenizer = Tokenizer.from_model_dir(model_dir)
        self.chat_template = ChatTemplate.from_model_dir(model_dir, chat_template)
        self.image_processor = ImageProcessor(ImageProcessorConfig.from_model_dir(model_dir))
        self.allowed_local_media_paths = tuple(allowed_local_media_paths)
        self.image_token_id = config.image_token_index

    # ---- entry points -------------------------------------------------------------------

    def process(self, prompt: str, images: Sequence[Any] = ()) -> ProcessedPrompt:
        """A text prompt with one ``<image>`` per image (PIL images, paths, URLs, bytes)."""
        pil_images = [self.load(source) for source in images]
        return self.process_loaded(prompt, pil_images)

    def process_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                     **template_kwargs: Any) -> ProcessedPrompt:
        """OpenAI-format messages through the chat template, images from their parts."""
        rendered = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, **template_kwargs
        )
        return self.process(rendered.text, rendered.image_sources)

    def load(self, source: Any) -> Image.Image:
        return load_image(source, allowed_local_paths=self.allowed_local_media_paths)

    # ---- pieces -------------------------------------------------------------------------

    def process_loaded(self, prompt: str, images: Sequence[Image.Image]) -> ProcessedPrompt:
        token_ids = self.tokenizer.encode(prompt)
        markers = [i for i, t in enumerate(token_ids) if t == self.image_token_id]
        if len(markers) != len(images):
            raise PromptError(
                f"the prompt has {len(markers)} <image> marker(s) but {len(images)} image(s) "
                "were given: put one <image> in the text for each image"
            )
        expanded: list[int] = []
        features: list[ImageFeature] = []
        previous = 0
        for marker, image in zip(markers, images):
            processed = self.image_processor.preprocess(image)
            count = self.config.num_image_tokens(processed.image_size)
            expanded.extend(token_ids[previous:marker])
            features.append(ImageFeature(
                identifier=image_content_hash(image),
                offset=len(expanded),
                length=count,
                data=processed,
            ))
            expanded.extend([self.image_token_id] * count)
            previous = marker + 1
        expanded.extend(token_ids[previous:])
        return ProcessedPrompt(prompt=prompt, token_ids=expanded, images=features)
