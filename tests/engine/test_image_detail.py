"""OpenAI image ``detail``: "low" serves a LLaVA-NeXT image from its base tile alone (576
tokens on the 336/14 tower, no grid, no image_newline); "auto"/"high" take the anyres path;
LLaVA 1.5 sees one tile whatever the detail."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from support import make_image

from caldera.engine import LLM, SamplingParams
from caldera.engine.chat_template import ChatTemplate, ChatTemplateError
from caldera.engine.messages import ImageData, TensorData
from caldera.engine.processor import InputProcessor, PromptError
from caldera.worker.config import ModelConfig
from caldera.worker.loader import load_model

NEXT_PROMPT = "[INST] <image>\nWhat is shown here? [/INST]"
BASE_TOKENS = (336 // 14) ** 2  # 576
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _chat(url: str, detail: str | None) -> list[dict]:
    image_url = {"url": url} if detail is None else {"url": url, "detail": detail}
    return [{"role": "user", "content": [
        {"type": "image_url", "image_url": image_url},
        {"type": "text", "text": "What is shown here?"},
    ]}]


@pytest.fixture(scope="module")
def next_processor(next_mistral_dir) -> InputProcessor:
    return InputProcessor(next_mistral_dir, ModelConfig.from_model_dir(next_mistral_dir))


# ---- chat template ------------------------------------------------------------------------


def test_render_gives_each_image_its_detail(next_mistral_dir):
    template = ChatTemplate.from_model_dir(next_mistral_dir)
    rendered = template.render([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.png", "detail": "low"}},
        {"type": "image_url", "image_url": "b.png"},
        {"type": "input_image", "image_url": "c.png", "detail": "high"},
        {"type": "image_url", "image_url": {"url": "d.png", "detail": None}},
        {"type": "text", "text": "Compare them."},
    ]}])
    assert rendered.image_sources == ["a.png", "b.png", "c.png", "d.png"]
    assert rendered.image_details == ["low", "auto", "high", "auto"]


@pytest.mark.parametrize("detail", ["medium", "LOW", "", 1])
def test_bad_detail_is_refused(next_mistral_dir, next_processor, detail):
    template = ChatTemplate.from_model_dir(next_mistral_dir)
    with pytest.raises(ChatTemplateError, match="'auto', 'low', 'high'"):
        template.render(_chat("a.png", detail))
    with pytest.raises(PromptError, match="'auto', 'low', 'high'"):
        next_processor.process_loaded(NEXT_PROMPT, [make_image(64, 64)], [detail])
    with pytest.raises(PromptError, match="one entry per image"):
        next_processor.process_loaded(NEXT_PROMPT, [make_image(64, 64)], ["low", "low"])


# ---- processor and model ------------------------------------------------------------------


def test_low_detail_is_the_base_tile(next_mistral_dir, next_processor):
    config = next_processor.config
    image = make_image(300, 500, seed=3)
    low = next_processor.process_loaded(NEXT_PROMPT, [image], ["low"])
    full = next_processor.process_loaded(NEXT_PROMPT, [image], ["high"])
    assert next_processor.process_loaded(NEXT_PROMPT, [image]).token_ids == full.token_ids

    low_image, full_image = low.images[0], full.images[0]
    assert low.token_ids.count(config.image_token_index) == BASE_TOKENS == low_image.length
    assert config.num_image_tokens((300, 500), base_only=True) == BASE_TOKENS
    assert full_image.length == config.num_image_tokens((300, 500)) > BASE_TOKENS
    assert low_image.data.base_only and not full_image.data.base_only
    assert low_image.identifier != full_image.identifier
    assert low_image.data.pixel_values.shape[0] == 1
    assert torch.equal(low_image.data.pixel_values, full_image.data.pixel_values[:1])

    model = load_model(next_mistral_dir, config, dtype=torch.float32,
                       device=torch.device("cpu"), progress=False)
    with torch.inference_mode():
        low_embeds = model.encode_image(low_image.data.pixel_values, (300, 500), base_only=True)
        full_embeds = model.encode_image(full_image.data.pixel_values, (300, 500))
    assert low_embeds.shape == (BASE_TOKENS, config.text.hidden_size)
    assert full_embeds.shape[0] == full_image.length
    torch.testing.assert_close(low_embeds, full_embeds[:BASE_TOKENS], rtol=1e-5, atol=1e-5)


def test_llava15_ignores_detail(llava15_dir):
    processor = InputProcessor(llava15_dir, ModelConfig.from_model_dir(llava15_dir))
    prompt = "USER: <image>\nWhat is shown here? ASSISTANT:"
    image = make_image(300, 500, seed=3)
    results = [processor.process_loaded(prompt, [image], [d]) for d in ("low", "auto", "high")]
    assert all(r.token_ids == results[0].token_ids for r in results)
    assert len({r.images[0].identifier for r in results}) == 1
    assert results[0].images[0].length == BASE_TOKENS
    assert not any(r.images[0].data.base_only for r in results)


def test_base_only_crosses_the_wire():
    import msgspec

    image = ImageData("h", 2, 576, (300, 500), TensorData.from_tensor(torch.zeros(1, 3, 2, 2)),
                      True)
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(image), type=ImageData)
    assert decoded.base_only is True
    # Field order is the wire format: base_only is appended last, older payloads decode.
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(image))[5] is True
    old = msgspec.msgpack.encode(["h", 2, 576, (300, 500), image.pixel_values])
    assert msgspec.msgpack.decode(old, type=ImageData).base_only is False


# ---- the engine ---------------------------------------------------------------------------


def test_low_and_full_detail_through_the_engine(next_mistral_dir):
    url = _data_url(make_image(300, 500, seed=5))
    low, full = _chat(url, "low"), _chat(url, None)

    with LLM(str(next_mistral_dir), kv_cache_memory="256MiB") as llm:
        together = llm.chat([low, full], GREEDY, use_tqdm=False)
    with LLM(str(next_mistral_dir), kv_cache_memory="256MiB") as llm:
        low_alone = llm.chat(low, GREEDY, use_tqdm=False)[0]
        full_alone = llm.chat(full, GREEDY, use_tqdm=False)[0]
        # The dict form of generate takes details too, and reuses the cached low image.
        generated = llm.generate(
            {"prompt": NEXT_PROMPT, "images": [url], "image_details": ["low"]}, GREEDY,
            use_tqdm=False,
        )[0]

    image_token = 32000
    assert low_alone.prompt_token_ids.count(image_token) == BASE_TOKENS
    assert full_alone.prompt_token_ids.count(image_token) > BASE_TOKENS
    assert len(low_alone.outputs[0].token_ids) == 8
    assert together[0].prompt_token_ids == low_alone.prompt_token_ids
    assert together[1].prompt_token_ids == full_alone.prompt_token_ids
    assert together[0].outputs[0].token_ids == low_alone.outputs[0].token_ids
    assert together[1].outputs[0].token_ids == full_alone.outputs[0].token_ids
    assert generated.prompt_token_ids.count(image_token) == BASE_TOKENS
