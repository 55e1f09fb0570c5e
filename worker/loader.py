"""Weights: find the checkpoint, build the model without allocating it, load tensor by tensor.

The model is built on the meta device, then handed to ``model_transform`` (tensor
parallelism swaps in its sharded layers there); each checkpoint tensor is then materialised
straight into its parameter in the target dtype and device. A module that defines
``load_weight(name, view, dtype, device)`` (a sharded layer) reads what it needs from a lazy
safetensors slice instead, so a rank reads only its share of the file. A linear is handed to
``linear_transform`` (ISQ's quantizer, for instance) the moment all its weights have arrived, so
a quantized model never holds more than one full-precision layer at a time; a sharded layer
applies it to its shard through ``transform_linear(name, transform)``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from caldera.worker.config import ModelConfig
from caldera.worker.models.llava import LlavaForConditionalGeneration

logger = logging.getLogger(__name__)

LinearTransform = Callable[..., nn.Module]  # (name, linear, **shard info) -> module
ModelTransform = Callable[[nn.Module], None]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
           "half": torch.float16, "float": torch.float32}

# transformers 5.x key prefixes -> the 4.x names our module tree uses.
_V5_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
    ("lm_head.", "language_model.lm_head."),
)


class ModelNotFoundError(ValueError):
    """The model id or path could not be resolved; the message says how to fix it."""


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hugging Face hub id, downloaded (or read from the hub
    cache) with huggingface_hub."""
    local = Path(model).expanduser()
    if local.is_dir():
        return local
    if local.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"model path {model!r} is not a folder")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # hub unreachable, repo missing, auth required, ...
        raise ModelNotFoundError(
            f"could not fetch model {model!r} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Download it where the hub is reachable (huggingface-cli download "
            f"{model} --local-dir DIR) and pass the folder path instead, e.g. --model DIR"
        ) from exc


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto`` takes the checkpoint's dtype; float16 on CPU becomes bfloat16 (CPU kernels for
    float16 are slow and overflow-prone)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return _DTYPES[dtype]
    resolved = _DTYPES.get(str(config.torch_dtype), torch.float32)
    if resolved == torch.float16 and device.type == "cpu":
        logger.info("dtype auto: checkpoint is float16, using bfloat16 on CPU")
        return torch.bfloat16
    return resolved


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if not found:
        raise ModelNotFoundError(f"{model_dir} holds no .safetensors weights")
    return found


def canonical_name(key: str) -> str:
    """Checkpoint key -> parameter name. Accepts the 4.x hub layout as is, and the 5.x layout
    with or without CLIP's ``vision_model`` level (newer transformers drop it)."""
    for new, old in _V5_PREFIXES:
        if key.startswith(new):
            key = old + key[len(new):]
            break
    if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
        key = "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for name, view in iter_checkpoint_slices(model_dir):
        yield name, view[:]


def iter_checkpoint_slices(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """(parameter name, lazy slice) of every checkpoint tensor; indexing a slice reads only
    the indexed part."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield canonical_name(key), f.get_slice(key)


def _count_tensors(model_dir: Path) -> int:
    total = 0
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def load_model(
    model_dir: Path,
    config: ModelConfig,
    *,
    dtype: torch.dtype,
    device: torch.device,
    linear_transform: LinearTransform | None = None,
    model_transform: ModelTransform | None = None,
    progress: bool = True,
) -> LlavaForConditionalGeneration:
    """Builds the model and loads the checkpoint into it; every parameter must be filled."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    if model_transform is not None:
        model_transform(model)
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    sharded = {name: m for name, m in model.named_modules() if hasattr(m, "load_weight")}
    pending = _pending_by_module(model, sharded)
    bar = tqdm(total=_count_tensors(model_dir), desc="loading weights", unit="tensor",
               disable=not progress or os.environ.get("CALDERA_NO_PROGRESS") == "1")
    for name, view in iter_checkpoint_slices(model_dir):
        bar.update(1)
        module_name, _, attr = name.rpartition(".")
        if module_name in sharded and attr in pending.get(module_name, ()):
            sharded[module_name].load_weight(attr, view, dtype, device)
        elif name in params:
            _materialise(model, name, params[name], view[:], dtype, device)
        elif name.endswith("rotary_emb.inv_freq") or name.startswith("vision_tower.vision_model.head"):
            continue
        else:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {config.architecture}")
        waiting = pending.get(module_name)
        if waiting is not None:
            waiting.discard(attr)
            if not waiting and linear_transform is not None:
                _transform(model, module_name, linear_transform)
    bar.close()
    _tie_and_check(model, config)
    return model


def _pending_by_module(model: nn.Module, sharded: dict[str, nn.Module]) -> dict[str, set[str]]:
    """Linear and sharded modules -> names of the weights still to load (a sharded module's
    own linear is loaded through it)."""
    pending = {name: set(module.weight_names()) for name, module in sharded.items()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rpartition(".")[0] not in sharded:
            pending[name] = {p for p, _ in module.named_parameters(recurse=False)}
    return pending


def _materialise(model: nn.Module, name: str, param: nn.Parameter, tensor: torch.Tensor,
                 dtype: torch.dtype, device: torch.device) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
            f"{tuple(param.shape)}: config.json and the weights disagree"
        )
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    setattr(module, attr, nn.Parameter(value, requires_grad=False))


def _transform(model: nn.Module, module_name: str, transform: LinearTransform) -> None:
    module = model.get_submodule(module_name)
    if hasattr(module, "transform_linear"):
        module.transform_linear(module_name, transform)
        return
    if not isinstance(module, nn.Linear):
        return
    replacement = transform(module_name, module)
    if replacement is not module:
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement)


def _tie_and_check(model: LlavaForConditionalGeneration, config: ModelConfig) -> None:
    lm = model.language_model
    if config.text.tie_word_embeddings and lm.lm_head.weight.is_meta:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing = [n for n in missing if not n.startswith("vision_tower.vision_model.post_layernorm")]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} tensors: {shown}")
