"""Llama / Mistral decoder over a flattened batch and a paged KV cache.

Mistral is Llama with GQA and (optionally) a sliding window; both share this file. The forward
takes every request's new tokens as one sequence axis ``[T]`` with ``positions[T]``; attention
writes the step's keys and values into the paged cache, then attends through the block tables
(see ``caldera.kernels.metadata``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from caldera.kernels import ops
from caldera.kernels.metadata import AttentionMetadata
from caldera.worker.config import TextConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # ([N, B, Hkv, D], [N, B, Hkv, D])


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate_half) with theta; cos/sin tables built once per
    device on first use (so a model built on the meta device needs no buffer fix-up)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each position's angles, ``[max_positions, head_dim / 2]``."""
        if device not in self._tables:
            exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            inv_freq = 1.0 / (self.theta**exponent)
            freqs = torch.outer(torch.arange(self.max_positions, dtype=torch.float32), inv_freq)
            self._tables[device] = (freqs.cos().to(device), freqs.sin().to(device))
        return self._tables[device]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``[T, 1, head_dim / 2]`` cos and sin of the step's positions, shared by all layers."""
        cos_table, sin_table = self.tables(positions.device)
        return cos_table[positions].unsqueeze(1).to(dtype), sin_table[positions].unsqueeze(1).to(
            dtype
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` over ``[T, heads, D]``, computed on the two halves
    (both halves of the neox tables are equal), with the same roundings as that expression."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    torch.sub(x1 * cos, x2 * sin, out=out[..., :half])
    torch.add(x2 * cos, x1 * sin, out=out[..., half:])
    return out


class LlamaAttention(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        rotary: tuple[torch.Tensor, torch.Tensor],
        hidden: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(tokens, -1, self.head_dim)
        k = self.k_proj(hidden).view(tokens, -1, self.head_dim)
        v = self.v_proj(hidden).view(tokens, -1, self.head_dim)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        key_cache, value_cache = kv_cache
        ops.write_kv(k, v, key_cache, value_cache, meta.slot_mapping)
        out = ops.paged_attention(q, key_cache, value_cache, meta, self.scale)
        return self.o_proj(out.reshape(tokens, -1))


class LlamaMlp(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rotary, hidden, kv_cache, meta) -> torch.Tensor:
        hidden = hidden + self.self_attn(rotary, self.input_layernorm(hidden), kv_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaModel(nn.Module):
    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta
        )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        hidden = inputs_embeds
        rotary = self.rotary.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden = layer(rotary, hidden, kv_cache, meta)
        return self.norm(hidden)


class LlamaForCausalLM(nn.Module):
    """``language_model`` of llava-hf checkpoints: ``model.*`` and ``lm_head``."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
