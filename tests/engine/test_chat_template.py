"""Chat templates: the prompt ids a chat request produces equal transformers' processor's."""

from __future__ import annotations

import copy
import json
import logging
import shutil

import pytest

from caldera.engine.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    ChatTemplateError,
    builtin_template,
    load_chat_template,
)
from caldera.engine.demo_checkpoints import SHAPES
from caldera.engine.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

SHAPE_NAMES = ("llava-1.5", "llava-next-mistral", "llava-next-vicuna")
URL_A = "https://example.com/a.jpg"
URL_B = "data:image/png;base64,iVBORw0KGgo="


def text(value):
    return {"type": "text", "text": value}


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


SEED_MESSAGES = [
    {
        "role": "user",
        "content": [
            image_url(
                "https://www.nhmagazine.com/content/uploads/2019/05/mtwashingtonFranconia-2-19-18-108-Edit-Edit.jpg"
            ),
            text("<image>What is shown in this image?"),
        ],
    }
]

# name -> (messages, the same conversation in the form transformers' processor renders as we
# do, or None when it takes the messages as they are)
CASES = {
    "text only": ([{"role": "user", "content": [text("Describe a sunset in one line.")]}], None),
    "one image": ([{"role": "user", "content": [image_url(URL_A), text("What is shown?")]}], None),
    "two images": (
        [
            {
                "role": "user",
                "content": [
                    text("Compare these."),
                    image_url(URL_A),
                    {"type": "image_url", "image_url": URL_B},
                ],
            }
        ],
        None,
    ),
    "multi-turn with system": (
        [
            {"role": "system", "content": [text("You are brief.")]},
            {"role": "user", "content": [image_url(URL_A), text("What is it?")]},
            {"role": "assistant", "content": [text("A mountain.")]},
            {"role": "user", "content": [text("How high is it?")]},
        ],
        None,
    ),
    # The processor would render string content as nothing; the template sees one text part.
    "string content": (
        [
            {"role": "system", "content": "You are brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        [
            {"role": "system", "content": [text("You are brief.")]},
            {"role": "user", "content": [text("Hi there")]},
            {"role": "assistant", "content": [text("Hello!")]},
            {"role": "user", "content": [text("Tell me a joke.")]},
        ],
    ),
    # The user wrote the marker: the processor would add a second one for the image part.
    "seed example": (
        SEED_MESSAGES,
        [{"role": "user", "content": [text("<image>What is shown in this image?")]}],
    ),
}

STRING_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'].strip() + ' ' }}{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'].strip() + ' ' }}{% else %}"
    "{{ 'ASSISTANT: ' + message['content'].strip() + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def processors(tiny_checkpoints):
    return {
        name: transformers.AutoProcessor.from_pretrained(tiny_checkpoints[name])
        for name in SHAPE_NAMES
    }


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints):
    return Tokenizer.from_model_dir(tiny_checkpoints["llava-1.5"])


def reference_ids(processor, messages, chat_template=None):
    prompt = processor.apply_chat_template(
        copy.deepcopy(messages), add_generation_prompt=True, chat_template=chat_template
    )
    return processor.tokenizer(prompt).input_ids


def num_images(messages):
    return sum(
        1
        for m in messages
        if isinstance(m["content"], list)
        for p in m["content"]
        if p["type"] != "text"
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_prompt_ids_match_processor(shape, case, tiny_checkpoints, processors, tokenizer):
    messages, reference_messages = CASES[case]
    rendered = ChatTemplate.from_model_dir(tiny_checkpoints[shape]).render(messages)
    ids = tokenizer.encode(rendered.text)
    assert ids == reference_ids(processors[shape], reference_messages or messages)
    assert rendered.num_images == num_images(messages)
    assert ids.count(tokenizer.image_token_id) == rendered.num_images
    assert ids.count(tokenizer.bos_token_id) == 1


def test_seed_example_has_one_marker(next_mistral_dir):
    rendered = ChatTemplate.from_model_dir(next_mistral_dir).render(SEED_MESSAGES)
    assert rendered.text == "[INST] <image>What is shown in this image? [/INST]"
    assert rendered.image_sources == [SEED_MESSAGES[0]["content"][0]["image_url"]["url"]]


# -- where templates come from ------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPE_NAMES)
def test_checkpoint_template_is_found(shape, tiny_checkpoints):
    assert load_chat_template(tiny_checkpoints[shape]) == SHAPES[shape].template


def test_checkpoint_template_precedence(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    assert load_chat_template(tmp_path) == "config"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert load_chat_template(tmp_path) == "json"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert load_chat_template(tmp_path) == "jinja"


def test_named_templates_pick_default(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "tools"},
                    {"name": "default", "template": "plain"},
                ]
            }
        )
    )
    assert load_chat_template(tmp_path) == "plain"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"}]}))
    with pytest.raises(ChatTemplateError, match="none named 'default'"):
        load_chat_template(tmp_path)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("llava-1.5", "llava-1.5"),
        ("llava-next-mistral", "mistral"),
        ("llava-next-vicuna", "vicuna"),
    ],
)
def test_builtin_by_model_type_when_checkpoint_has_none(
    shape, expected, tiny_checkpoints, tmp_path, caplog
):
    shutil.copy(tiny_checkpoints[shape] / "config.json", tmp_path / "config.json")
    with caplog.at_level(logging.WARNING, logger="caldera.engine.chat_template"):
        assert load_chat_template(tmp_path) == builtin_template(expected)
    assert f"built-in {expected!r} template" in caplog.text


def test_override_jinja_file(llava15_dir, processors, tokenizer, tmp_path):
    path = tmp_path / "mistral.jinja"
    path.write_text(SHAPES["llava-next-mistral"].template)
    messages, _ = CASES["multi-turn with system"]
    rendered = ChatTemplate.from_model_dir(llava15_dir, override=str(path)).render(messages)
    assert rendered.text.startswith("<<SYS>>\nYou are brief.")
    assert tokenizer.encode(rendered.text) == reference_ids(
        processors["llava-1.5"], messages, chat_template=path.read_text()
    )


def test_override_json_file_with_string_content_template(
    next_vicuna_dir, processors, tokenizer, tmp_path
):
    """A JSON file carrying ``chat_template`` (and other tokenizer_config keys), whose template
    treats content as a string: the text parts are joined, images go first as markers."""
    path = tmp_path / "vicuna.json"
    path.write_text(json.dumps({"add_bos_token": True, "chat_template": STRING_TEMPLATE}))
    template = ChatTemplate.from_model_dir(next_vicuna_dir, override=str(path))
    assert template.content_format == "string"
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": [image_url(URL_A), text("What is shown?")]},
    ]
    rendered = template.render(messages)
    assert rendered.text == "Be kind. USER: <image>\nWhat is shown? ASSISTANT:"
    as_strings = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "<image>\nWhat is shown?"},
    ]
    assert tokenizer.encode(rendered.text) == reference_ids(
        processors["llava-next-vicuna"], as_strings, chat_template=STRING_TEMPLATE
    )
    # The user's own marker is kept where they wrote it.
    rendered = template.render(SEED_MESSAGES)
    assert rendered.text == "USER: <image>What is shown in this image? ASSISTANT:"


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
@pytest.mark.parametrize(
    "case", ["one image", "two images", "multi-turn with system", "string content"]
)
def test_override_builtin_names(name, case, llava15_dir, processors, tokenizer):
    messages, reference_messages = CASES[case]
    rendered = ChatTemplate.from_model_dir(llava15_dir, override=name).render(messages)
    assert tokenizer.encode(rendered.text) == reference_ids(
        processors["llava-1.5"],
        reference_messages or messages,
        chat_template=builtin_template(name),
    )


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("llava-1.5", "llava-1.5"),
        ("mistral", "llava-next-mistral"),
        ("vicuna", "llava-next-vicuna"),
    ],
)
def test_builtins_render_as_hub_templates(name, shape, tiny_checkpoints):
    ours, hub = (
        ChatTemplate(builtin_template(name)),
        ChatTemplate.from_model_dir(tiny_checkpoints[shape]),
    )
    for case in ("one image", "two images", "multi-turn with system", "seed example"):
        messages, _ = CASES[case]
        if name == "vicuna" and messages[0]["role"] != "system":
            # Vicuna writes LLaVA's default system line where the hub template writes none.
            assert ours.render(messages).text.startswith("A chat between a curious human")
            continue
        assert ours.render(messages).text == hub.render(messages).text


def test_unknown_override_names_the_choices(llava15_dir):
    with pytest.raises(ChatTemplateError, match="llava-1.5, vicuna, mistral"):
        load_chat_template(llava15_dir, override="chatml")


# -- rendering ----------------------------------------------------------------------------


def test_image_sources_in_message_order():
    template = ChatTemplate(builtin_template("llava-1.5"))
    pixels = object()
    messages = [
        {
            "role": "user",
            "content": [image_url(URL_A), {"type": "image", "image": pixels}, text("Two.")],
        },
        {"role": "assistant", "content": "Ok."},
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": URL_B},
                {"type": "image_url", "image_url": "file.png"},
            ],
        },
    ]
    rendered = template.render(messages)
    assert rendered.image_sources == [URL_A, pixels, URL_B, "file.png"]
    assert rendered.num_images == rendered.text.count("<image>") == 4


def test_special_tokens_and_tojson_are_available(llava15_dir):
    source = "{{ bos_token }}{{ messages[0]['content'][0] | tojson }}{{ eos_token }}"
    rendered = ChatTemplate.from_model_dir(llava15_dir, override=source).render(
        [{"role": "user", "content": "é <b>"}]
    )
    assert rendered.text == '<s>{"type": "text", "text": "é <b>"}</s>'


def test_generation_tag_renders_its_body():
    source = (
        "{% for m in messages %}{% generation %}[{{ m['content'][0]['text'] }}]"
        "{% endgeneration %}{% endfor %}"
    )
    rendered = ChatTemplate(source).render([{"role": "assistant", "content": "hi"}])
    assert rendered.text == "[hi]"


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "tool", "content": "x"}], "role 'tool'; accepted roles: system, user"),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x"}]}], "type 'audio'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        (
            [{"role": "user", "content": [text("<image><image>"), image_url(URL_A)]}],
            "found 1 images and 2 <image> markers",
        ),
        ([{"role": "user", "content": "what is <image>?"}], "found 0 images and 1 <image>"),
        ([{"role": "user", "content": 5}], "must be a string or a list"),
        (["hello"], r"messages\[0\] must be an object"),
        ([], "non-empty list"),
        # The Mistral template writes only the first text of a system message: its image is lost.
        (
            [
                {"role": "system", "content": [text("x"), image_url(URL_A)]},
                {"role": "user", "content": "hi"},
            ],
            "wrote 0 <image> markers for 1 images",
        ),
    ],
)
def test_user_errors_are_value_errors(messages, match):
    template = ChatTemplate(builtin_template("mistral"))
    with pytest.raises(ValueError, match=match) as info:
        template.render(messages)
    assert isinstance(info.value, ChatTemplateError)


def test_raise_exception_becomes_chat_template_error():
    template = ChatTemplate("{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        template.render([{"role": "user", "content": "hi"}])


def test_template_is_sandboxed():
    template = ChatTemplate("{{ messages.__class__.__mro__ }}{{ ''.__class__.mro() }}")
    with pytest.raises(ChatTemplateError):
        template.render([{"role": "user", "content": "hi"}])


def test_syntax_error_is_reported():
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_template_kwargs_become_variables():
    template = ChatTemplate(
        "{{ bos_token }}{{ greeting }} {{ add_generation_prompt }}", {"bos_token": "<s>"}
    )
    rendered = template.render(
        [{"role": "user", "content": "hi"}],
        greeting="hello",
        bos_token="[BOS]",
        add_generation=object(),
    )
    assert rendered.text == "[BOS]hello True"
