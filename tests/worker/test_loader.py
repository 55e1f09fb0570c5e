"""Weights and configs: both key layouts, shards, dtypes, and errors a user can cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from caldera.kernels.metadata import AttentionMetadata
from caldera.worker.config import ModelConfig, UnsupportedModelError
from caldera.worker.loader import ModelNotFoundError, load_model, resolve_model_path


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in model.state_dict().items()}


def _load(path, dtype=torch.float32):
    config = ModelConfig.from_model_dir(path)
    return load_model(path, config, dtype=dtype, device=torch.device("cpu"), progress=False)


@pytest.mark.parametrize("shape", ["llava-1.5", "llava-next-mistral"])
def test_v5_layout_and_shards_load_the_same_weights(shape, tiny_checkpoint):
    reference = _state(_load(tiny_checkpoint(shape)))
    for options in ({"layout": "v5"}, {"num_shards": 3}, {"layout": "v5", "num_shards": 2}):
        path = tiny_checkpoint(shape, **options)
        state = _state(_load(path))
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference), options


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtypes(dtype, tiny_checkpoint):
    path = tiny_checkpoint("llava-1.5", dtype="float16")
    model = _load(path, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    config = ModelConfig.from_model_dir(path)
    shape = (8, 16, config.text.num_kv_heads, config.text.head_dim)
    caches = [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
              for _ in range(config.text.num_layers)]
    meta = AttentionMetadata.build([5], [5], [[3]], 16)
    with torch.inference_mode():
        hidden = model(torch.tensor([1, 733, 16289, 28793, 22557]), torch.arange(5), caches, meta)
        logits = model.compute_logits(hidden)
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_unsupported_architecture_names_the_supported_ones(tmp_path, llava15_dir):
    shutil.copytree(llava15_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="LlavaNextForConditionalGeneration"):
        ModelConfig.from_model_dir(tmp_path / "m")


def test_missing_tensor_is_reported(tmp_path, llava15_dir):
    from safetensors.torch import load_file, save_file

    shutil.copytree(llava15_dir, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["language_model.model.norm.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="missing 1 tensors: language_model.model.norm.weight"):
        _load(tmp_path / "m")


def test_unreachable_hub_says_how_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path("llava-hf/llava-1.5-7b-hf")
    message = str(info.value)
    assert "llava-hf/llava-1.5-7b-hf" in message and "folder path" in message


def test_real_config_defaults_are_filled():
    # llava-1.5-7b-hf's config.json names only a few text fields; the rest are Llama defaults.
    raw = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "text_config": {"model_type": "llama", "max_position_embeddings": 4096,
                        "rms_norm_eps": 1e-05, "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "model_type": "clip_vision_model", "num_attention_heads": 16,
                          "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
        "image_token_index": 32000,
    }
    config = ModelConfig.from_dict(raw)
    assert (config.text.hidden_size, config.text.num_layers, config.text.num_kv_heads) == (
        4096, 32, 32)
    assert config.num_image_tokens((480, 640)) == 576
    assert config.vision.hidden_act == "quick_gelu"
