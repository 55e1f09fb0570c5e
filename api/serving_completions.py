"""POST /v1/completions: OpenAI's legacy API over text or token-id prompts (no images).

``echo`` puts the prompt before each completion; with ``logprobs`` it also returns the
prompt tokens' logprobs (the first token has none), as OpenAI's legacy API did."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from caldera.api.errors import APIError, bad_request
from caldera.api.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
)
from caldera.api.serving import (
    SSE_DONE,
    ServingContext,
    finish_reason,
    generate,
    sse,
    sse_error,
    token_text,
    usage,
)
from caldera.api.validation import check_completion_unsupported, check_model
from caldera.api.validation import completion_sampling_params as sampling_params_of
from caldera.engine.outputs import Logprob, RequestOutput
from caldera.engine.processor import ProcessedPrompt
from caldera.engine.sampling_params import SamplingParams
from caldera.engine.tokenizer import Tokenizer

MAX_PROMPTS = 64


@dataclass
class PreparedCompletion:
    model: str
    prompts: list[ProcessedPrompt]
    params: SamplingParams


def _items(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if all(isinstance(t, str) for t in prompt) or all(isinstance(t, list) for t in prompt):
        return prompt
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a "
                      "list of token-id lists", param="prompt")


def _prompts(ctx: ServingContext, prompt: str | list) -> list[ProcessedPrompt]:
    items = _items(prompt)
    if not items:
        raise bad_request("prompt is empty", param="prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    image_id = ctx.llm.model_config.image_token_index
    vocab = ctx.vocab_size
    out = []
    for item in items:
        if isinstance(item, str):
            ids = ctx.tokenizer.encode(item)
            text: str | None = item
        else:
            ids, text = list(item), None  # type: ignore[call-overload]
            if not ids:
                raise bad_request("a token-id prompt is empty", param="prompt")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise bad_request(f"prompt token id {bad[0]} is outside the vocabulary "
                                  f"(0..{vocab - 1})", param="prompt")
        if image_id in ids:
            raise bad_request("/v1/completions takes no images; send images through "
                              "/v1/chat/completions", param="prompt")
        out.append(ProcessedPrompt(prompt=text if text is not None
                                   else ctx.tokenizer.decode(ids), token_ids=ids))
    return out


def prepare_completion(ctx: ServingContext, req: CompletionRequest) -> PreparedCompletion:
    model = check_model(req.model, ctx.config.served_model_names)
    check_completion_unsupported(req)
    params = sampling_params_of(req, ctx.vocab_size)
    prompts = _prompts(ctx, req.prompt)
    for processed in prompts:
        try:
            ctx.llm.check_prompt(processed, params)
        except ValueError as exc:
            raise bad_request(str(exc), param="prompt", code="context_length_exceeded") from None
    return PreparedCompletion(model, prompts, params)


def _logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
              entries: Sequence[dict[int, Logprob]], top: int,
              offset: int) -> CompletionLogprobs:
    tokens, values, tops, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text, _ = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        values.append(entry[token_id].logprob)
        ranked = sorted((lp.rank or 0, tid, lp.logprob) for tid, lp in entry.items()
                        if lp.rank is not None and lp.rank <= top)
        tops.append({token_text(tokenizer, tid)[0]: value for _, tid, value in ranked[:top]})
    return CompletionLogprobs(tokens, values, tops, offsets)


def leading_text(tokenizer: Tokenizer, prompt_ids: Sequence[int],
                 output_ids: Sequence[int]) -> str:
    """What decoding the output alone drops at its start (sentencepiece's leading space),
    so that prompt + completion reads as the model wrote it."""
    if not prompt_ids or not output_ids:
        return ""
    head = tokenizer.decode(prompt_ids[-1:], skip_special_tokens=True)
    joined = tokenizer.decode([prompt_ids[-1], output_ids[0]], skip_special_tokens=True)
    alone = tokenizer.decode(output_ids[:1], skip_special_tokens=True)
    middle = joined[len(head):] if joined.startswith(head) else ""
    if alone and middle.endswith(alone):
        return middle[: len(middle) - len(alone)]
    return ""


def _choices(ctx: ServingContext, req: CompletionRequest, out: RequestOutput,
             base_index: int, prompt_text: str) -> list[CompletionChoice]:
    choices = []
    top = req.logprobs or 0
    for c in out.outputs:
        text = leading_text(ctx.tokenizer, out.prompt_token_ids, c.token_ids) + c.text
        if req.echo:
            text = prompt_text + text
        logprobs = None
        if req.logprobs is not None:
            parts_ids: list[int] = []
            parts_entries: list = []
            if req.echo:  # the first prompt token has no logprob: the schema has no null
                parts_ids += out.prompt_token_ids[1:]
                parts_entries += list(out.prompt_logprobs or [])[1:]
            parts_ids += c.token_ids
            parts_entries += list(c.logprobs or [])
            logprobs = _logprobs(ctx.tokenizer, parts_ids, parts_entries, top, 0)
        choices.append(CompletionChoice(base_index + c.index, text, logprobs,
                                        finish_reason(c.finish_reason) or "stop"))
    return choices


def _sum_usage(usages: list[Usage]) -> Usage:
    first = usages[0]
    if len(usages) == 1:
        return first
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return Usage(prompt_tokens=prompt, completion_tokens=completion,
                 total_tokens=prompt + completion)


async def full_response(ctx: ServingContext, req: CompletionRequest,
                        prepared: PreparedCompletion, request_id: str) -> Completion:
    created = int(time.time())

    async def one(i: int, processed: ProcessedPrompt) -> RequestOutput:
        final = None
        async for out in generate(ctx, processed, prepared.params, f"{request_id}-{i}"):
            final = out
        assert final is not None
        return final

    finals = await asyncio.gather(*(one(i, p) for i, p in enumerate(prepared.prompts)))
    choices: list[CompletionChoice] = []
    n = prepared.params.n
    for i, (processed, final) in enumerate(zip(prepared.prompts, finals)):
        choices += _choices(ctx, req, final, i * n, processed.prompt or "")
    return Completion(id=request_id, created=created, model=prepared.model, choices=choices,
                      object="text_completion",
                      usage=_sum_usage([usage(f, 0) for f in finals]))


async def stream_response(ctx: ServingContext, req: CompletionRequest,
                          prepared: PreparedCompletion, request_id: str) -> AsyncIterator[bytes]:
    created = int(time.time())
    n = prepared.params.n
    queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, processed: ProcessedPrompt) -> None:
        try:
            async for out in generate(ctx, processed, prepared.params, f"{request_id}-{i}"):
                await queue.put((i, out))
        except BaseException as exc:  # handed to the response; cancellation included
            await queue.put(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await queue.put(None)

    def chunk(choices: list[CompletionChoice], **extra) -> bytes:
        return sse(Completion(id=request_id, created=created, model=prepared.model,
                              choices=choices, object="text_completion", **extra))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prepared.prompts)]
    sent: dict[tuple[int, int], int] = {}
    finals: dict[int, RequestOutput] = {}
    remaining = len(tasks)
    try:
        if req.echo:
            for i, processed in enumerate(prepared.prompts):
                for j in range(n):
                    yield chunk([CompletionChoice(i * n + j, processed.prompt or "", None,
                                                  None)])
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, APIError):
                yield sse_error(item)
                yield SSE_DONE
                return
            if isinstance(item, BaseException):
                raise item
            i, out = item
            finals[i] = out
            for c in out.outputs:
                key = (i, c.index)
                text = c.text[sent.get(key, 0):]
                if key not in sent and text:
                    text = leading_text(ctx.tokenizer, out.prompt_token_ids, c.token_ids) + text
                reason = finish_reason(c.finish_reason)
                if not text and reason is None:
                    continue
                sent[key] = len(c.text)
                yield chunk([CompletionChoice(i * n + c.index, text, None, reason)])
        if req.stream_options is not None and req.stream_options.include_usage and finals:
            yield chunk([], usage=_sum_usage([usage(f, 0) for f in finals.values()]))
        yield SSE_DONE
    finally:
        for task in tasks:
            task.cancel()
