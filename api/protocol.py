"""The OpenAI wire format as msgspec Structs: what ``caldera serve`` decodes and encodes.

Requests decode strictly by type (a wrong type is a 400 naming the JSON path); fields OpenAI
defines that Caldera does not implement are declared so they can be refused by name instead of
silently ignored (see ``api/validation.py``). Responses follow ../openai's schemas: a field
the schema marks required-but-nullable (``message.content``, ``message.refusal``,
``choices[].logprobs``, a chunk's ``finish_reason``) has no default and is always written;
every other optional field is omitted when unset, never written as null.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class ImageURL(msgspec.Struct, forbid_unknown_fields=False):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageURLPart(msgspec.Struct, tag="image_url", tag_field="type"):
    # mistral.rs and some clients send the URL as a bare string.
    image_url: ImageURL | str


class InputAudioPart(msgspec.Struct, tag="input_audio", tag_field="type"):
    input_audio: Any = None


class FilePart(msgspec.Struct, tag="file", tag_field="type"):
    file: Any = None


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str = ""


ContentPart = TextPart | ImageURLPart | InputAudioPart | FilePart | RefusalPart


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    include_obfuscation: bool = False


class ResponseFormat(msgspec.Struct, forbid_unknown_fields=False):
    type: str


class _SamplingFields(msgspec.Struct, kw_only=True):
    """Parameters chat and legacy completions share (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extensions of vLLM and mistral.rs.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    priority: int = 0
    # Caldera's extension: per-image details of what the model saw (see docs/web-ui.md).
    caldera_details: bool = False


class ChatCompletionRequest(_SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # OpenAI fields Caldera does not implement: refused when set (api/validation.py).
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids, or a list of token-id lists (msgspec
    # takes one array type in a union: the elements are checked in serving_completions).
    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct):
    error: ErrorInfo


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    image_tokens: int = 0


class Usage(msgspec.Struct, omit_defaults=True):
    """OpenAI's usage, plus mistral.rs's throughput figures (the seed's examples print them)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    avg_tok_per_sec: float = 0.0
    avg_prompt_tok_per_sec: float = 0.0
    avg_compl_tok_per_sec: float = 0.0
    total_time_sec: float = 0.0
    total_prompt_time_sec: float = 0.0
    total_completion_time_sec: float = 0.0


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(msgspec.Struct):
    content: str | None
    refusal: str | None = None
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str


class ChatCompletion(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    object: Literal["chat.completion"]
    usage: Usage | None = None
    caldera: dict[str, Any] | None = None


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, omit_defaults=True):
    index: int
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"]
    usage: Usage | None = None
    caldera: dict[str, Any] | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"]
    usage: Usage | None = None


class ModelCard(msgspec.Struct, omit_defaults=True):
    id: str
    created: int
    owned_by: str
    object: Literal["model"]
    root: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"]


class TokenizeResponse(msgspec.Struct):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(msgspec.Struct):
    prompt: str
