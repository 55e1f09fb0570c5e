"""Chat templates: OpenAI-format messages -> the prompt text the checkpoint's processor makes.

The template is the checkpoint's own (chat_template.jinja, chat_template.json, or the
``chat_template`` of tokenizer_config.json), or an override: a Jinja file, a JSON file with a
``chat_template`` key, or a built-in name (``llava-1.5``, ``vicuna``, ``mistral``, kept in
``templates/*.jinja``). It renders in a sandboxed Jinja environment set up as transformers sets
it up, and sees what the processor gives it: image parts as ``{"type": "image"}``, string
content as one text part. Templates written for string content (they never iterate over
``message['content']``) get the text parts joined instead, with one ``"<image>\\n"`` per image
in front.

Each image part may carry an OpenAI ``detail`` ("auto", "low" or "high"; in ``image_url``, or
on the part itself as the Responses API writes it); ``render`` returns it beside each image.

Every image becomes exactly one ``<image>`` in the prompt. Either the user wrote the markers in
the text (``"<image>What is shown?"``, as LLaVA clients do), and the template is not shown the
image parts, or the user wrote none and the template places them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from caldera.engine.tokenizer import IMAGE_TOKEN, read_special_tokens_map

logger = logging.getLogger(__name__)

BUILTIN_TEMPLATES = ("llava-1.5", "vicuna", "mistral")
ROLES = ("system", "user", "assistant")
TEXT_PART_TYPES = ("text", "input_text")
IMAGE_PART_TYPES = ("image_url", "image", "input_image")
# OpenAI's image detail levels; "auto" when a part names none.
IMAGE_DETAILS = ("auto", "low", "high")
# Where each image part type keeps its image, in the order looked at.
_IMAGE_KEYS = {
    "image_url": ("image_url",),
    "image": ("image", "url", "path"),
    "input_image": ("image_url", "image"),
}


class ChatTemplateError(ValueError):
    """A chat template that cannot be loaded, or messages it cannot render."""


# -- loading ---------------------------------------------------------------------------------


def builtin_template(name: str) -> str:
    """Source of a built-in template: one of :data:`BUILTIN_TEMPLATES`."""
    if name not in BUILTIN_TEMPLATES:
        raise ChatTemplateError(
            f"unknown built-in chat template {name!r}; choose one of {', '.join(BUILTIN_TEMPLATES)}"
        )
    return (resources.files("caldera.engine") / "templates" / f"{name}.jinja").read_text(
        encoding="utf-8"
    )


def _pick_named(value: Any, where: str) -> str:
    """A template value as transformers stores it: a string, or named templates (a list of
    ``{"name", "template"}`` or a dict) of which "default" is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        if isinstance(value.get("default"), str):
            return value["default"]
        raise ChatTemplateError(
            f"{where} holds chat templates named {sorted(map(str, value))} but none named "
            "'default'; pass the template to use as an override"
        )
    raise ChatTemplateError(f"{where}: chat_template must be a string, got {type(value).__name__}")


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ChatTemplateError(f"cannot read chat template file {path}: {exc}") from exc


def checkpoint_template(model_dir: str | os.PathLike) -> str | None:
    """The checkpoint's own template, or None: chat_template.jinja, then chat_template.json,
    then tokenizer_config.json's ``chat_template``."""
    folder = Path(model_dir)
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            data = _read_json_file(path)
            if isinstance(data, dict) and data.get("chat_template") is not None:
                return _pick_named(data["chat_template"], str(path))
    return None


def default_template_name(model_dir: str | os.PathLike) -> str:
    """The built-in template for a checkpoint without one, from its config.json: Mistral
    language models -> "mistral"; Llama (Vicuna) -> "vicuna" for LLaVA-NeXT, else "llava-1.5"."""
    path = Path(model_dir) / "config.json"
    config = _read_json_file(path) if path.is_file() else {}
    if not isinstance(config, dict):
        config = {}
    text_config = config.get("text_config") or {}
    text_type = text_config.get("model_type") or config.get("model_type")
    if text_type == "mistral":
        return "mistral"
    if config.get("model_type") == "llava_next":
        return "vicuna"
    return "llava-1.5"


def _template_from_override(override: str) -> str:
    if override in BUILTIN_TEMPLATES:
        return builtin_template(override)
    path = Path(override)
    if path.is_file():
        if path.suffix == ".json":
            data = _read_json_file(path)
            if not isinstance(data, dict) or "chat_template" not in data:
                raise ChatTemplateError(f"{path} has no 'chat_template' key")
            return _pick_named(data["chat_template"], str(path))
        return path.read_text(encoding="utf-8")
    if "{{" in override or "{%" in override:
        return override  # the template text itself
    raise ChatTemplateError(
        f"chat template {override!r} is neither a file nor a built-in template; pass a path to "
        f"a .jinja or .json file, or one of {', '.join(BUILTIN_TEMPLATES)}"
    )


def load_chat_template(model_dir: str | os.PathLike, override: str | None = None) -> str:
    """The template source to use for a checkpoint.

    ``override`` (from ``--chat-template``) wins: a Jinja file, a JSON file with a
    ``chat_template`` key, or a built-in name. Without it, the checkpoint's own template;
    without that, the built-in one for the checkpoint's language model (logged).
    """
    if override is not None:
        return _template_from_override(override)
    source = checkpoint_template(model_dir)
    if source is not None:
        return source
    name = default_template_name(model_dir)
    logger.warning(
        "%s has no chat template; using the built-in %r template (pass "
        "--chat-template to choose another)",
        model_dir,
        name,
    )
    return builtin_template(name)


# -- the Jinja environment -------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers'
    training masks; rendering a prompt just renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' tojson: plain json.dumps, without Jinja's HTML escaping.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _is_content_access(node: nodes.Node) -> bool:
    if isinstance(node, nodes.Getitem):
        return isinstance(node.arg, nodes.Const) and node.arg.value == "content"
    return isinstance(node, nodes.Getattr) and node.attr == "content"


def _content_format(ast: nodes.Template) -> Literal["openai", "string"]:
    """ "openai" when the template reads content as a list of parts (loops over it or indexes
    it), else "string". Filters such as ``| selectattr(...)`` are looked through."""
    for loop in ast.find_all(nodes.For):
        target = loop.iter
        while isinstance(target, (nodes.Filter, nodes.Test)):
            target = target.node
        if _is_content_access(target):
            return "openai"
    for item in ast.find_all(nodes.Getitem):
        if (
            _is_content_access(item.node)
            and isinstance(item.arg, nodes.Const)
            and isinstance(item.arg.value, int)
        ):
            return "openai"
    return "string"


def _plain(value: Any) -> Any:
    """JSON-like data only: the sandbox guards attribute access, but objects a caller passes
    in may still carry methods with side effects, so anything else becomes a placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


# -- messages --------------------------------------------------------------------------------


@dataclass
class _Part:
    kind: Literal["text", "image"]
    text: str = ""
    source: Any = None
    detail: str = "auto"


def _image_source(part: dict, where: str) -> Any:
    """The image a part names: the url of an ``image_url`` (an object or a string), the
    ``image`` (or HF-style ``url`` / ``path``) of an ``image`` part."""
    keys = _IMAGE_KEYS[part["type"]]
    for key in keys:
        value = part.get(key)
        if isinstance(value, dict) and key == "image_url":
            value = value.get("url")
        if value is not None and value != "":
            return value
    raise ChatTemplateError(f"{where}: a {part['type']!r} part needs a {' or '.join(keys)!r} field")


def _image_detail(part: dict, where: str) -> str:
    """The ``detail`` of an image part: in its ``image_url`` object, else on the part."""
    nested = part.get("image_url")
    detail = nested.get("detail") if isinstance(nested, dict) else None
    if detail is None:
        detail = part.get("detail")
    if detail is None:
        return "auto"
    if detail not in IMAGE_DETAILS:
        raise ChatTemplateError(
            f"{where}: image detail {detail!r} is not accepted; use one of "
            f"{', '.join(map(repr, IMAGE_DETAILS))}"
        )
    return detail


def _parse_part(part: Any, where: str) -> _Part:
    if isinstance(part, str):
        return _Part("text", text=part)
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ChatTemplateError(f"{where} must be an object with a 'type' field")
    kind = part["type"]
    if kind in TEXT_PART_TYPES:
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}: a text part needs a string 'text' field")
        return _Part("text", text=text)
    if kind in IMAGE_PART_TYPES:
        return _Part(
            "image", source=_image_source(part, where), detail=_image_detail(part, where)
        )
    raise ChatTemplateError(
        f"{where} has type {kind!r}; accepted types: "
        f"{', '.join(TEXT_PART_TYPES + IMAGE_PART_TYPES)}"
    )


def _parse_message(message: Any, index: int) -> tuple[str, list[_Part], dict[str, str]]:
    """(role, parts, other string fields such as ``name``) of one message."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ChatTemplateError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ChatTemplateError(f"{where} has role {role!r}; accepted roles: {', '.join(ROLES)}")
    content = message.get("content")
    if content is None:
        parts = [_Part("text")]
    elif isinstance(content, str):
        parts = [_Part("text", text=content)]
    elif isinstance(content, list):
        parts = [_parse_part(p, f"{where}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise ChatTemplateError(f"{where}.content must be a string or a list of parts")
    extra = {
        k: v for k, v in message.items() if k not in ("role", "content") and isinstance(v, str)
    }
    return role, parts, extra


@dataclass(frozen=True)
class RenderedPrompt:
    """The prompt text, with one ``<image>`` per image; ``image_sources`` are the images in
    the order of their markers (as given in the messages: url strings or objects), and
    ``image_details`` their detail levels (one of :data:`IMAGE_DETAILS` each)."""

    text: str
    num_images: int
    image_sources: list[Any] = field(default_factory=list)
    image_details: list[str] = field(default_factory=list)


class ChatTemplate:
    """A compiled chat template: ``render(messages)`` gives the prompt for the tokenizer."""

    def __init__(
        self,
        source: str,
        special_tokens: dict[str, str] | None = None,
        image_token: str = IMAGE_TOKEN,
    ) -> None:
        """``special_tokens`` (``bos_token``, ``eos_token``, ...) are template variables."""
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.image_token = image_token
        env = _environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(
                f"chat template does not compile: line {exc.lineno}: {exc.message}"
            ) from exc
        self.content_format = _content_format(ast)

    @classmethod
    def from_model_dir(
        cls, model_dir: str | os.PathLike, override: str | None = None
    ) -> ChatTemplate:
        """The template :func:`load_chat_template` picks, with the folder's special tokens."""
        return cls(load_chat_template(model_dir, override), read_special_tokens_map(model_dir))

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs: Any
    ) -> RenderedPrompt:
        """Renders OpenAI-format messages; raises ChatTemplateError (a ValueError) for
        messages the template cannot take, with what to change.

        ``template_kwargs`` (a request's ``chat_template_kwargs``) become template variables,
        as plain JSON-like data; they can replace the special-token variables, not ``messages``
        or ``add_generation_prompt``."""
        if not isinstance(messages, list) or not messages:
            raise ChatTemplateError("messages must be a non-empty list")
        parsed = [_parse_message(m, i) for i, m in enumerate(messages)]
        images = [p for _, parts, _ in parsed for p in parts if p.kind == "image"]
        sources = [p.source for p in images]
        show_images = self._user_markers(parsed, len(sources)) == 0
        template_messages = [
            self._template_message(role, parts, extra, show_images) for role, parts, extra in parsed
        ]
        variables = {
            **self.special_tokens,
            **_plain(template_kwargs),
            "tools": None,
            "documents": None,
        }
        variables.update(messages=template_messages, add_generation_prompt=add_generation_prompt)
        text = self._render(variables)
        placed = text.count(self.image_token)
        if placed != len(sources):
            raise ChatTemplateError(
                f"the chat template wrote {placed} {self.image_token} markers for "
                f"{len(sources)} images; put images only in messages whose role the template "
                f"renders images for (user messages), or write one {self.image_token} per image "
                "in the text"
            )
        return RenderedPrompt(
            text=text,
            num_images=len(sources),
            image_sources=sources,
            image_details=[p.detail for p in images],
        )

    def _user_markers(self, parsed: list, num_images: int) -> int:
        markers = sum(
            p.text.count(self.image_token)
            for _, parts, _ in parsed
            for p in parts
            if p.kind == "text"
        )
        if markers not in (0, num_images):
            raise ChatTemplateError(
                f"found {num_images} images and {markers} {self.image_token} markers in the "
                f"message text; write exactly one {self.image_token} per image where it belongs, "
                "or none and the template places them"
            )
        return markers

    def _template_message(
        self, role: str, parts: list[_Part], extra: dict[str, str], show_images: bool
    ) -> dict[str, Any]:
        images = [p for p in parts if p.kind == "image"] if show_images else []
        texts = [p.text for p in parts if p.kind == "text"]
        if self.content_format == "string":
            content: Any = f"{self.image_token}\n" * len(images) + "\n".join(texts)
        else:
            content = [
                {"type": "text", "text": p.text} if p.kind == "text" else {"type": "image"}
                for p in parts
                if p.kind == "text" or show_images
            ]
        return {**extra, "role": role, "content": content}

    def _render(self, variables: dict[str, Any]) -> str:
        try:
            return self._template.render(variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template rejected the messages: {exc}") from exc
        except (TypeError, LookupError, AttributeError, ArithmeticError) as exc:
            # Raised by Python operations the template runs on message values.
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from exc
