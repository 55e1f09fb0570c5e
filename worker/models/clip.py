"""CLIP ViT vision tower (the ``vision_tower.vision_model`` of llava-hf checkpoints).

Runs a batch of image tiles ``[N, 3, S, S]`` and returns the hidden states of the selected
feature layers. Layers past the deepest selected one are never run (layer -2 skips the last).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from caldera.worker.config import VisionConfig


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class ClipEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, config.patch_size, config.patch_size,
            bias=False,
        )
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[N, L, H, D] each -> [N, L, H, D], full (non-causal) attention."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def select_vision_attention(device: torch.device, dtype: torch.dtype) -> tuple[AttentionFn, str]:
    """xformers' memory-efficient attention on CUDA when it imports and supports the device
    and dtype, else torch SDPA. Returns the function and its name (for the log line)."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import xformers.ops as xops

            probe = torch.zeros(1, 2, 1, 64, device=device, dtype=dtype)
            xops.memory_efficient_attention(probe, probe, probe)
        except Exception:  # not installed, or built without kernels for this device
            pass
        else:
            return xops.memory_efficient_attention, "xformers"
    return sdpa_attention, "torch sdpa"


class ClipAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.attention_fn: AttentionFn = sdpa_attention
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.num_heads, self.head_dim)

        out = self.attention_fn(heads(self.q_proj(x)), heads(self.k_proj(x)),
                                heads(self.v_proj(x)))
        return self.out_proj(out.reshape(n, length, -1))


class ClipMlp(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.self_attn = ClipAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ClipMlp(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(config) for _ in range(config.num_layers))


class ClipVisionModel(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {config.hidden_act!r}")
        self.config = config
        self.embeddings = ClipEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = ClipEncoder(config)
        # post_layernorm exists in checkpoints but never touches LLaVA's features.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, feature_layers: tuple[int, ...]) -> torch.Tensor:
        """Hidden states of ``feature_layers`` (transformers' ``hidden_states`` indexing: 0 is
        the embedding output, -1 the last layer), concatenated on the channel axis."""
        num_states = len(self.encoder.layers) + 1
        wanted = [i % num_states for i in feature_layers]
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: hidden}
        for i, layer in enumerate(self.encoder.layers[: max(wanted)], start=1):
            hidden = layer(hidden)
            states[i] = hidden
        return torch.cat([states[i] for i in wanted], dim=-1)


class VisionTower(nn.Module):
    """Holds ``vision_model`` so parameter names match the checkpoints'."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.vision_model = ClipVisionModel(config)

    def set_attention(self, fn: AttentionFn) -> None:
        for layer in self.vision_model.encoder.layers:
            layer.self_attn.attention_fn = fn
