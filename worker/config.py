"""Model architecture config, parsed once from a llava-hf ``config.json``.

Real llava-hf configs omit every field that equals the transformers default of the sub-model
type (llava-1.5-7b-hf's text_config names only a handful), so the defaults below are those of
LlamaConfig, MistralConfig and CLIPVisionConfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caldera.worker.models.image_tokens import num_image_tokens

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")

_TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, vocab_size=32000, sliding_window=None),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    vocab_size=32000, sliding_window=4096),
}
_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3,
)


class UnsupportedModelError(ValueError):
    """A checkpoint this engine cannot serve; the message says what is supported."""


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    hidden_act: str = "silu"


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str
    layer_norm_eps: float
    num_channels: int

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_index: int
    projector_hidden_act: str
    projector_bias: bool
    vision_feature_layers: tuple[int, ...]
    vision_feature_select_strategy: str
    image_grid_pinpoints: tuple[tuple[int, int], ...] | None
    torch_dtype: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_next(self) -> bool:
        return self.architecture == "LlavaNextForConditionalGeneration"

    def num_image_tokens(self, image_size: tuple[int, int], base_only: bool = False) -> int:
        """Placeholder tokens for an image of original (height, width); ``base_only``: just
        the base tile of a LLaVA-NeXT image (low detail)."""
        return num_image_tokens(
            image_size,
            tile_size=self.vision.image_size,
            patch_size=self.vision.patch_size,
            image_grid_pinpoints=self.image_grid_pinpoints,
            keep_cls=self.vision_feature_select_strategy == "full",
            base_only=base_only,
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise UnsupportedModelError(f"{path} has no config.json; is it a model folder?")
        return cls.from_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        architectures = raw.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {architectures or raw.get('model_type')!r}; "
                f"Caldera serves {', '.join(SUPPORTED_ARCHITECTURES)} (llava-hf checkpoints)"
            )
        layers = raw.get("vision_feature_layer", -2)
        strategy = raw.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"unknown vision_feature_select_strategy {strategy!r}")
        pinpoints = raw.get("image_grid_pinpoints")
        if arch == "LlavaNextForConditionalGeneration":
            if strategy != "default":
                raise UnsupportedModelError("LLaVA-NeXT supports only the 'default' strategy")
            pinpoints = pinpoints or [[336, 672], [672, 336], [672, 672], [1008, 336],
                                      [336, 1008]]
        return cls(
            architecture=arch,
            text=_parse_text(raw.get("text_config") or {}, raw),
            vision=_parse_vision(raw.get("vision_config") or {}),
            image_token_index=int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
            projector_hidden_act=raw.get("projector_hidden_act", "gelu"),
            projector_bias=bool(raw.get("multimodal_projector_bias", True)),
            vision_feature_layers=tuple(layers) if isinstance(layers, list) else (int(layers),),
            vision_feature_select_strategy=strategy,
            image_grid_pinpoints=(tuple((int(h), int(w)) for h, w in pinpoints)
                                  if arch == "LlavaNextForConditionalGeneration" else None),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            raw=raw,
        )


def _parse_text(text: dict, top: dict) -> TextConfig:
    model_type = text.get("model_type", "llama")
    if model_type not in _TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"unsupported language model type {model_type!r}; supported: llama, mistral"
        )
    rope_scaling = text.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise UnsupportedModelError(f"rope_scaling {rope_scaling!r} is not supported")
    if text.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"text hidden_act {text['hidden_act']!r} is not supported")
    d = {**_TEXT_DEFAULTS[model_type], **{k: v for k, v in text.items() if v is not None}}
    if "sliding_window" in text and text["sliding_window"] is None:
        d["sliding_window"] = None
    heads = int(d["num_attention_heads"])
    rope_params = text.get("rope_parameters") or {}
    return TextConfig(
        model_type=model_type,
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(d.get("head_dim") or d["hidden_size"] // heads),
        rms_norm_eps=float(d["rms_norm_eps"]),
        rope_theta=float(rope_params.get("rope_theta", d["rope_theta"])),
        vocab_size=int(d["vocab_size"]),
        max_position_embeddings=int(d["max_position_embeddings"]),
        sliding_window=int(d["sliding_window"]) if d.get("sliding_window") else None,
        tie_word_embeddings=bool(text.get("tie_word_embeddings",
                                          top.get("tie_word_embeddings", False))),
    )


def _parse_vision(vision: dict) -> VisionConfig:
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise UnsupportedModelError(
            f"unsupported vision tower {vision.get('model_type')!r}; supported: clip_vision_model"
        )
    d = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    return VisionConfig(
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=int(d["num_attention_heads"]),
        image_size=int(d["image_size"]),
        patch_size=int(d["patch_size"]),
        hidden_act=str(d["hidden_act"]),
        layer_norm_eps=float(d["layer_norm_eps"]),
        num_channels=int(d["num_channels"]),
    )
