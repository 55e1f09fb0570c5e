"""POST /v1/chat/completions: messages -> chat template -> images -> engine -> JSON or SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from caldera.api.errors import APIError, bad_request
from caldera.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceLogprobs,
    DeltaMessage,
)
from caldera.api.serving import (
    SSE_DONE,
    ServingContext,
    chat_logprobs,
    finish_reason,
    generate,
    image_token_count,
    prepare_prompt,
    sse,
    sse_error,
    usage,
)
from caldera.api.validation import chat_sampling_params, check_chat_unsupported, check_model
from caldera.engine.chat_template import ChatTemplateError
from caldera.engine.outputs import RequestOutput
from caldera.engine.processor import ProcessedPrompt, PromptError
from caldera.engine.sampling_params import SamplingParams

# The render call's own parameters: a template variable of the same name would collide.
_RESERVED_TEMPLATE_KWARGS = frozenset({"self", "messages", "add_generation_prompt"})


@dataclass
class PreparedChat:
    model: str
    processed: ProcessedPrompt
    params: SamplingParams


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    messages = []
    for i, message in enumerate(req.messages):
        if message.role in ("tool", "function") or message.tool_calls:
            raise bad_request(f"messages[{i}]: tool and function messages are not supported "
                              "(Caldera does not do tool calling)", param=f"messages[{i}]")
        plain = msgspec.to_builtins(message)
        plain.pop("name", None)
        if message.role == "developer":  # OpenAI's newer name for the system message
            plain["role"] = "system"
        if plain.get("content") is None:
            plain["content"] = ""
        for j, part in enumerate(plain["content"] if isinstance(plain["content"], list) else ()):
            if part["type"] not in ("text", "image_url"):
                raise bad_request(f"messages[{i}].content[{j}]: {part['type']!r} parts are "
                                  "not supported; send text and image_url parts",
                                  param=f"messages[{i}].content[{j}]")
        messages.append(plain)
    return messages


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest) -> PreparedChat:
    """Validation first (cheap), then images (fetch, decode, preprocess)."""
    model = check_model(req.model, ctx.config.served_model_names)
    check_chat_unsupported(req)
    params = chat_sampling_params(req, ctx.vocab_size)
    messages = _messages(req)
    template_kwargs = req.chat_template_kwargs or {}
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & template_kwargs.keys())
    if reserved:
        raise bad_request(f"chat_template_kwargs cannot set {reserved[0]!r}; send it as the "
                          "request's own field", param="chat_template_kwargs")
    try:
        rendered = ctx.llm.processor.chat_template.render(
            messages, add_generation_prompt=req.add_generation_prompt, **template_kwargs)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), param="messages") from None
    processed = await prepare_prompt(ctx, rendered.text, rendered.image_sources,
                                     rendered.image_details)
    try:
        ctx.llm.check_prompt(processed, params)
    except PromptError as exc:
        raise bad_request(str(exc), param="messages", code="context_length_exceeded") from None
    ctx.metrics.observe_request_images(len(processed.images), image_token_count(processed))
    return PreparedChat(model, processed, params)


def _details(ctx: ServingContext, req: ChatCompletionRequest,
             processed: ProcessedPrompt) -> dict[str, Any] | None:
    if not req.caldera_details:
        return None
    from caldera.api.image_info import describe_image

    config = ctx.llm.processor.image_processor.config
    return {"images": [describe_image(f.data, f.length, config) for f in processed.images]}


def _choice_logprobs(ctx: ServingContext, req: ChatCompletionRequest, token_ids: list[int],
                     entries: list | None) -> ChoiceLogprobs | None:
    if not req.logprobs or entries is None:
        return None
    return ChoiceLogprobs(chat_logprobs(ctx.tokenizer, token_ids, entries,
                                        req.top_logprobs or 0))


async def full_response(ctx: ServingContext, req: ChatCompletionRequest, prepared: PreparedChat,
                        request_id: str) -> ChatCompletion:
    created = int(time.time())
    final: RequestOutput | None = None
    async for out in generate(ctx, prepared.processed, prepared.params, request_id):
        final = out
    assert final is not None
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=_choice_logprobs(ctx, req, c.token_ids, c.logprobs),
            finish_reason=finish_reason(c.finish_reason) or "stop",
        )
        for c in final.outputs
    ]
    return ChatCompletion(
        id=request_id, created=created, model=prepared.model, choices=choices,
        object="chat.completion", usage=usage(final, image_token_count(prepared.processed)),
        caldera=_details(ctx, req, prepared.processed),
    )


async def stream_response(ctx: ServingContext, req: ChatCompletionRequest,
                          prepared: PreparedChat, request_id: str) -> AsyncIterator[bytes]:
    """SSE: a role chunk per choice, content deltas, a finish chunk per choice, the usage
    chunk when asked for, ``[DONE]``. An error after the first byte is an error event."""
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], **extra: Any) -> bytes:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=prepared.model,
                                       choices=choices, object="chat.completion.chunk",
                                       **extra))

    n = prepared.params.n
    for index in range(n):
        yield chunk([ChatChunkChoice(index, DeltaMessage(role="assistant", content=""), None)])
    sent = [0] * n
    sent_logprobs = [0] * n
    done = [False] * n
    final: RequestOutput | None = None
    try:
        async for out in generate(ctx, prepared.processed, prepared.params, request_id):
            final = out
            for c in out.outputs:
                if done[c.index]:
                    continue
                text = c.text[sent[c.index]:]
                entries = c.logprobs[sent_logprobs[c.index]:] if c.logprobs else None
                ids = c.token_ids[sent_logprobs[c.index]:]
                reason = finish_reason(c.finish_reason)
                if not text and reason is None and not entries:
                    continue
                sent[c.index] = len(c.text)
                sent_logprobs[c.index] = len(c.token_ids)
                extra = {}
                if reason is not None:
                    done[c.index] = True
                    if all(done):
                        details = _details(ctx, req, prepared.processed)
                        if details is not None:
                            extra["caldera"] = details
                yield chunk([ChatChunkChoice(
                    c.index, DeltaMessage(content=text) if text else DeltaMessage(), reason,
                    _choice_logprobs(ctx, req, ids, entries))], **extra)
    except APIError as exc:
        yield sse_error(exc)
        yield SSE_DONE
        return
    if req.stream_options is not None and req.stream_options.include_usage and final:
        yield chunk([], usage=usage(final, image_token_count(prepared.processed)))
    yield SSE_DONE
