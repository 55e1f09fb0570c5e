"""LLaVA 1.5 and LLaVA-NeXT: CLIP tower + projector + Llama/Mistral decoder.

The runner calls three things per step:

- ``encode_image(pixel_values, image_size, base_only)``: the embeddings that fill one image's
  placeholder tokens, ``[num_image_tokens(image_size, base_only), hidden]``;
- ``forward(input_ids, positions, image_embeds, image_mask, kv_caches, meta)``: hidden states
  of the step's tokens, image embeddings written at the placeholder rows;
- ``compute_logits(hidden)``.

Module names follow the transformers 4.x checkpoint keys, so weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caldera.kernels.metadata import AttentionMetadata
from caldera.worker.config import ModelConfig
from caldera.worker.models.clip import ACTIVATIONS, VisionTower
from caldera.worker.models.image_tokens import anyres_grid_shape, unpadded_features_shape
from caldera.worker.models.llama import KVCache, LlamaForCausalLM


class MultiModalProjector(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vision_dim = config.vision.hidden_size * len(config.vision_feature_layers)
        hidden = config.text.hidden_size
        self.linear_1 = nn.Linear(vision_dim, hidden, bias=config.projector_bias)
        act = config.projector_hidden_act
        self.act = F.gelu if act == "gelu" else ACTIVATIONS[act]
        self.linear_2 = nn.Linear(hidden, hidden, bias=config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    """Both architectures: LLaVA-NeXT adds anyres packing and ``image_newline``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.projector_hidden_act not in ("gelu", *ACTIVATIONS):
            raise ValueError(f"unsupported projector_hidden_act {config.projector_hidden_act!r}")
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text)
        if config.is_next:
            self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))

    # ---- images -------------------------------------------------------------------------

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] tiles -> [N, features per tile, hidden] projected features."""
        features = self.vision_tower.vision_model(pixel_values, self.config.vision_feature_layers)
        if self.config.vision_feature_select_strategy == "default":
            features = features[:, 1:]
        return self.multi_modal_projector(features)

    def encode_image(
        self, pixel_values: torch.Tensor, image_size: tuple[int, int], base_only: bool = False
    ) -> torch.Tensor:
        """One image's placeholder embeddings, ``[num_image_tokens, hidden]``."""
        return self.pack_image(self.encode_tiles(pixel_values), image_size, base_only)

    def pack_image(
        self, tiles: torch.Tensor, image_size: tuple[int, int], base_only: bool = False
    ) -> torch.Tensor:
        """One image's encoded tiles ``[N, features per tile, hidden]`` -> its placeholder
        embeddings. LLaVA 1.5, or a LLaVA-NeXT image at low detail (``base_only``, its base
        tile alone): the tile's features as they are; else :meth:`pack_anyres`."""
        if not self.config.is_next:
            return tiles.reshape(-1, tiles.shape[-1])
        if base_only:
            return tiles[0]
        return self.pack_anyres(tiles, image_size)

    def pack_anyres(self, tiles: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Base tile, then the grid tiles stitched into one feature map, cropped back to the
        image's aspect ratio, each row ended by ``image_newline``."""
        vision = self.config.vision
        side = vision.image_size // vision.patch_size
        rows, cols = anyres_grid_shape(image_size, self.config.image_grid_pinpoints,
                                       vision.image_size)
        base, grid = tiles[0], tiles[1:]
        hidden = grid.shape[-1]
        # [rows*cols, side*side, C] -> [C, rows*side, cols*side]
        grid = grid.view(rows, cols, side, side, hidden).permute(4, 0, 2, 1, 3)
        grid = grid.reshape(hidden, rows * side, cols * side)
        top, bottom, left, right = unpadded_features_shape(image_size, rows * side, cols * side)
        grid = grid[:, top:bottom, left:right]
        newline = self.image_newline[:, None, None].expand(hidden, grid.shape[1], 1)
        grid = torch.cat([grid, newline.to(grid.dtype)], dim=-1)
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)

    # ---- language model -----------------------------------------------------------------

    def embed(
        self,
        input_ids: torch.Tensor,  # [T]
        image_embeds: torch.Tensor | None,  # [num image rows, hidden]
        image_mask: torch.Tensor | None,  # [T] bool, True at placeholder rows
    ) -> torch.Tensor:
        embed_tokens = self.language_model.model.embed_tokens
        if image_embeds is None or image_mask is None:
            return embed_tokens(input_ids)
        # Placeholder ids may lie outside a trimmed vocabulary: embed them as 0 and overwrite.
        embeds = embed_tokens(input_ids.masked_fill(image_mask, 0))
        embeds[image_mask] = image_embeds.to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        image_embeds: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        embeds = self.embed(input_ids, image_embeds, image_mask)
        return self.language_model.model(embeds, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)
