"""Tensor parallelism as a transformation of the built model (the model code stays plain).

``parallelize_model`` swaps the language model's layers, on the meta device before any weight
is loaded, for layers that hold one rank's share and know how to read it from the checkpoint
(``load_weight``, called by the loader with a lazy safetensors slice, so a rank reads only its
rows or columns)::

    attention   q_proj, k_proj, v_proj   column-parallel by heads      (no communication)
                o_proj                   row-parallel                   all-reduce
    MLP         gate_proj, up_proj       column-parallel
                down_proj                row-parallel                   all-reduce
    embed_tokens                         vocabulary-parallel rows       all-reduce
    lm_head                              vocabulary-parallel rows       gather to rank 0

Rank r holds query heads ``[r * H / tp, (r + 1) * H / tp)``. With at least as many KV heads as
ranks it holds KV heads ``[r * Hkv / tp, ...)``; with fewer, each KV head is replicated on the
``tp / Hkv`` consecutive ranks whose query heads use it. The vocabulary is padded to a multiple
of tp (padding rows are zero and never sampled). The vision tower and the projector are
replicated: every rank encodes the step's images itself, with no communication.

The column- and row-parallel layers wrap a plain ``nn.Linear`` of the shard's shape, so ISQ and
CPU weight packing apply to the shard as to any linear. A row-parallel shard quantized to int8
takes its per-channel scale from the whole row (a max over the ranks), and an int4 shard splits
the input features on group boundaries, so a quantized shard is exactly the same slice of the
weight ISQ would give with one rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from caldera.worker.config import ModelConfig, TextConfig
from caldera.worker.distributed import TensorParallelGroup

# A lazy view of one checkpoint tensor (safetensors' slice): ``get_shape()`` and indexing.
TensorView = Any


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks; the message says what would work."""


# ==== planning ===============================================================================


def check_tensor_parallel(config: ModelConfig, world_size: int,
                          isq_group_size: int | None = None) -> None:
    """Raises TensorParallelError unless the language model splits evenly over ``world_size``
    ranks (and int4 groups of ``isq_group_size`` fit each rank's input features)."""
    text = config.text
    if world_size < 1:
        raise TensorParallelError(f"tensor_parallel_size must be at least 1, got {world_size}")
    if world_size == 1:
        return
    problems = []
    if text.num_heads % world_size:
        problems.append(f"its {text.num_heads} attention heads")
    kv = text.num_kv_heads
    if kv % world_size and world_size % kv:
        problems.append(f"its {kv} key/value heads (nor is {world_size} a multiple of them)")
    if text.intermediate_size % world_size:
        problems.append(f"its MLP width {text.intermediate_size}")
    if problems:
        raise TensorParallelError(
            f"tensor_parallel_size={world_size} does not divide {' or '.join(problems)}; "
            f"choose a size that divides {text.num_heads}"
        )
    if isq_group_size is not None:
        for name, width in (("o_proj", text.num_heads * text.head_dim // world_size),
                            ("down_proj", text.intermediate_size // world_size)):
            if width % isq_group_size:
                raise TensorParallelError(
                    f"int4 ISQ groups of {isq_group_size} do not fit the {width} input features "
                    f"each rank holds of {name}; choose an isq_group_size that divides {width}"
                )


def local_heads(text: TextConfig, rank: int, world_size: int) -> tuple[range, range]:
    """The query heads and KV heads rank ``rank`` holds."""
    per_rank = text.num_heads // world_size
    q = range(rank * per_rank, (rank + 1) * per_rank)
    if text.num_kv_heads >= world_size:
        kv_per_rank = text.num_kv_heads // world_size
        return q, range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
    replicas = world_size // text.num_kv_heads
    return q, range(rank // replicas, rank // replicas + 1)


def local_num_kv_heads(text: TextConfig, world_size: int) -> int:
    return max(text.num_kv_heads // world_size, 1)


def _heads_to_rows(heads: range, head_dim: int) -> tuple[int, int]:
    return heads.start * head_dim, heads.stop * head_dim


def _even_share(size: int, rank: int, world_size: int) -> tuple[int, int]:
    per_rank = size // world_size
    return rank * per_rank, (rank + 1) * per_rank


def _materialise(value: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return nn.Parameter(value.contiguous(), requires_grad=False)


def _check_shape(name: str, view: TensorView, expected: tuple[int, ...]) -> None:
    shape = tuple(view.get_shape())
    if shape != expected:
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {shape}, the config implies {expected}: "
            "config.json and the weights disagree"
        )


# ==== layers =================================================================================


class ColumnParallelLinear(nn.Module):
    """Output features ``[start, stop)`` of a linear; the output stays split across ranks."""

    def __init__(self, in_features: int, out_features: int, start: int, stop: int,
                 bias: bool) -> None:
        super().__init__()
        self.full_shape = (out_features, in_features)
        self.start, self.stop = start, stop
        self.linear = nn.Linear(in_features, stop - start, bias=bias)

    def weight_names(self) -> set[str]:
        return {"weight", "bias"} if self.linear.bias is not None else {"weight"}

    def load_weight(self, name: str, view: TensorView, dtype: torch.dtype,
                    device: torch.device) -> None:
        _check_shape(name, view, self.full_shape if name == "weight" else self.full_shape[:1])
        setattr(self.linear, name, _materialise(view[self.start:self.stop], dtype, device))

    def transform_linear(self, name: str, transform: Callable[..., nn.Module]) -> None:
        self.linear = transform(name, self.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class RowParallelLinear(nn.Module):
    """Input features ``[start, stop)`` of a linear, its partial outputs summed over the ranks
    (the bias, replicated, added once after the sum)."""

    def __init__(self, in_features: int, out_features: int, start: int, stop: int, bias: bool,
                 group: TensorParallelGroup) -> None:
        super().__init__()
        self.full_shape = (out_features, in_features)
        self.start, self.stop = start, stop
        self.group = group
        self.linear = nn.Linear(stop - start, out_features, bias=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def weight_names(self) -> set[str]:
        return {"weight", "bias"} if self.bias is not None else {"weight"}

    def load_weight(self, name: str, view: TensorView, dtype: torch.dtype,
                    device: torch.device) -> None:
        if name == "bias":
            _check_shape(name, view, self.full_shape[:1])
            self.bias = _materialise(view[:], dtype, device)
            return
        _check_shape(name, view, self.full_shape)
        self.linear.weight = _materialise(view[:, self.start:self.stop], dtype, device)

    def transform_linear(self, name: str, transform: Callable[..., nn.Module]) -> None:
        self.linear = transform(name, self.linear, reduce_max=self.group.all_reduce_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group.all_reduce(self.linear(x))
        return out + self.bias if self.bias is not None else out


class _VocabShard(nn.Module):
    """Rows ``[start, stop)`` of the vocabulary, padded to a multiple of the rank count."""

    def __init__(self, vocab_size: int, hidden_size: int, group: TensorParallelGroup) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.group = group
        padded = -(-vocab_size // group.world_size) * group.world_size
        self.start, self.stop = _even_share(padded, group.rank, group.world_size)
        self.weight = nn.Parameter(torch.empty(self.stop - self.start, hidden_size))

    def weight_names(self) -> set[str]:
        return {"weight"}

    def load_weight(self, name: str, view: TensorView, dtype: torch.dtype,
                    device: torch.device) -> None:
        _check_shape(name, view, (self.vocab_size, self.weight.shape[1]))
        self.weight = _materialise(_padded_rows(view, self.start, self.stop, self.vocab_size),
                                   dtype, device)


class VocabParallelEmbedding(_VocabShard):
    """Each rank embeds the ids it holds, zeros the others, and the sum over the ranks is the
    full lookup."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        outside = (input_ids < self.start) | (input_ids >= self.stop)
        local = (input_ids - self.start).masked_fill_(outside, 0)
        embeds = F.embedding(local, self.weight).masked_fill_(outside[:, None], 0)
        return self.group.all_reduce(embeds)


class ParallelLMHead(_VocabShard):
    """Logits of this rank's vocabulary rows; the full logits ``[R, vocab_size]`` are
    gathered on rank 0, and the other ranks get None (only rank 0 samples)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.group.gather(F.linear(hidden, self.weight), dim=-1)
        return logits[:, : self.vocab_size] if logits is not None else None


def _padded_rows(view: TensorView, start: int, stop: int, vocab_size: int) -> torch.Tensor:
    rows = view[start:min(stop, vocab_size)] if start < vocab_size else None
    if rows is not None and rows.shape[0] == stop - start:
        return rows
    width = view.get_shape()[1]
    out = torch.zeros((stop - start, width), dtype=rows.dtype if rows is not None else None)
    if rows is not None:
        out[: rows.shape[0]] = rows
    return out


# ==== the transformation =====================================================================


def parallelize_model(model: nn.Module, config: ModelConfig, group: TensorParallelGroup) -> None:
    """Swaps the language model of a LLaVA model (built on the meta device) for this rank's
    tensor-parallel share, in place. The vision tower and projector stay whole."""
    check_tensor_parallel(config, group.world_size)
    with torch.device("meta"):
        _swap_language_model(model.language_model, config.text, group)


def _swap_language_model(lm: nn.Module, text: TextConfig, group: TensorParallelGroup) -> None:
    rank, world = group.rank, group.world_size
    q_heads, kv_heads = local_heads(text, rank, world)
    q_rows, kv_rows = _heads_to_rows(q_heads, text.head_dim), _heads_to_rows(kv_heads,
                                                                              text.head_dim)
    inter = _even_share(text.intermediate_size, rank, world)
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _column(attn.q_proj, *q_rows)
        attn.k_proj = _column(attn.k_proj, *kv_rows)
        attn.v_proj = _column(attn.v_proj, *kv_rows)
        attn.o_proj = _row(attn.o_proj, *q_rows, group)
        attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
        mlp.gate_proj = _column(mlp.gate_proj, *inter)
        mlp.up_proj = _column(mlp.up_proj, *inter)
        mlp.down_proj = _row(mlp.down_proj, *inter, group)
    # A tied head takes the embedding's shard when the loader ties the weights.
    lm.model.embed_tokens = VocabParallelEmbedding(text.vocab_size, text.hidden_size, group)
    lm.lm_head = ParallelLMHead(text.vocab_size, text.hidden_size, group)


def _column(linear: nn.Linear, start: int, stop: int) -> ColumnParallelLinear:
    return ColumnParallelLinear(linear.in_features, linear.out_features, start, stop,
                                linear.bias is not None)


def _row(linear: nn.Linear, start: int, stop: int,
         group: TensorParallelGroup) -> RowParallelLinear:
    return RowParallelLinear(linear.in_features, linear.out_features, start, stop,
                             linear.bias is not None, group)
