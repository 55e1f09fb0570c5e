"""What chat and legacy completions share: the serving context, prompts with their images
(fetched within limits, prepared in the image pool, timed), logprob formatting, usage, SSE
framing and running a request to its end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from caldera.api.config import ServerConfig
from caldera.api.errors import APIError, bad_request
from caldera.api.metrics import Metrics
from caldera.api.protocol import (
    ErrorInfo,
    ErrorResponse,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from caldera.engine.async_llm import AsyncLLM
from caldera.engine.core_client import EngineDeadError
from caldera.engine.image_pool import ImagePool
from caldera.engine.media import MediaError, MediaLimits, MediaTooLargeError, read_image_async
from caldera.engine.outputs import Logprob, RequestOutput
from caldera.engine.processor import ProcessedPrompt, PromptError
from caldera.engine.sampling_params import SamplingParams
from caldera.engine.tokenizer import Tokenizer

_encode = msgspec.json.Encoder().encode


@dataclass
class ServingContext:
    """Everything a handler needs; one per app."""

    llm: AsyncLLM
    config: ServerConfig
    metrics: Metrics
    http: httpx.AsyncClient
    images: ImagePool
    started: float = 0.0
    media_limits: MediaLimits = field(init=False)

    def __post_init__(self) -> None:
        config = self.config
        self.media_limits = MediaLimits(
            max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels,
            timeout=config.media_fetch_timeout, allow_private=config.allow_private_media_urls,
            allowed_local_paths=config.allowed_local_media_paths)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.llm.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.llm.model_config.text.vocab_size


# ---- images ------------------------------------------------------------------------------


async def prepare_prompt(ctx: ServingContext, prompt: str, sources: Sequence[Any],
                         details: Sequence[str] | None) -> ProcessedPrompt:
    """Tokenization with its ``<image>`` count check first (cheap), then every image fetched
    concurrently, then decoded and preprocessed in the image pool (off the event loop and,
    with image workers, out of this process)."""
    limit = ctx.config.limit_images_per_prompt
    if len(sources) > limit:
        raise bad_request(f"the request has {len(sources)} images; this server takes at most "
                          f"{limit} per prompt (--limit-images-per-prompt)", param="messages")
    processor = ctx.llm.processor
    try:
        token_ids = await asyncio.to_thread(processor.tokenize, prompt, len(sources), details)
        if not sources:
            return processor.assemble(prompt, token_ids, [])
        started = time.monotonic()
        data = await asyncio.gather(*(read_image_async(s, ctx.media_limits, ctx.http)
                                      for s in sources))
        ctx.metrics.observe_image_fetch(time.monotonic() - started)
        results = await asyncio.gather(*(
            ctx.images.prepare(d, base_only)
            for d, base_only in zip(data, processor.base_only(details, len(sources)))))
    except PromptError as exc:
        raise bad_request(str(exc), param="messages") from None
    except MediaTooLargeError as exc:
        raise APIError(413, str(exc), param="messages", code="image_too_large") from None
    except MediaError as exc:
        raise bad_request(str(exc), param="messages", code="invalid_image") from None
    for result in results:
        ctx.metrics.observe_image_prepared(result.decode_seconds, result.preprocess_seconds,
                                           cached=result.cached)
    return processor.assemble(prompt, token_ids, [r.image for r in results])


def image_token_count(processed: ProcessedPrompt) -> int:
    return sum(image.length for image in processed.images)


# ---- running ------------------------------------------------------------------------------


class Admission:
    """Counts the requests the server has taken; refuses past the queue limit (429) before
    any image work is done for them."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    def __enter__(self) -> Admission:
        ctx = self.ctx
        if not ctx.llm.is_healthy:
            raise APIError(503, "the engine is not running: "
                                f"{ctx.llm.dead_reason or 'starting up'}", code="engine_dead")
        limit = ctx.config.max_queued_requests
        if limit is not None:
            waiting = ctx.metrics.in_flight - ctx.llm.config.max_num_seqs
            if waiting >= limit:
                raise APIError(429, f"the server has {ctx.metrics.in_flight} requests in "
                                    f"flight, over its queue limit of {limit} waiting; retry "
                                    "later", code="queue_full",
                               headers={"Retry-After": "1"})
        ctx.metrics.in_flight += 1
        self._held = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Idempotent: the request no longer counts."""
        if getattr(self, "_held", False):
            self._held = False
            self.ctx.metrics.in_flight -= 1


async def run_to_end(ctx: ServingContext, processed: ProcessedPrompt,
                     params: SamplingParams, request_id: str) -> RequestOutput:
    final: RequestOutput | None = None
    async for out in generate(ctx, processed, params, request_id):
        final = out
    assert final is not None
    return final


async def generate(ctx: ServingContext, processed: ProcessedPrompt, params: SamplingParams,
                   request_id: str) -> AsyncIterator[RequestOutput]:
    """The engine's outputs, with its failures turned into API errors."""
    try:
        async for out in ctx.llm.generate(processed, params, request_id):
            if out.finished and out.error is not None:
                raise bad_request(out.error)
            yield out
    except EngineDeadError as exc:
        raise APIError(503, f"the engine stopped: {exc}", code="engine_dead") from None


async def watch_disconnect(receive_disconnected, task: asyncio.Task) -> None:
    """Cancels ``task`` (and so aborts its request) when the client goes away."""
    while not task.done():
        if await receive_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.05)


def client_gone() -> APIError:
    """The answer to a request whose client went away (nobody reads it; nginx's 499)."""
    return APIError(499, "the client closed the connection", code="client_closed_request")


async def until_done_or_disconnect(request, coro) -> Any:
    """Runs ``coro``; a client that disconnects first cancels it (its request is aborted)."""
    task = asyncio.ensure_future(coro)
    watcher = asyncio.ensure_future(watch_disconnect(request.is_disconnected, task))
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():  # the client went, not the server
            raise client_gone() from None
        raise
    finally:
        watcher.cancel()


# ---- output pieces ------------------------------------------------------------------------


def usage(out: RequestOutput, image_tokens: int) -> Usage:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    m = out.metrics
    now = m.finished_time or time.monotonic()
    first = m.first_token_time or now
    prompt_time = max(first - m.arrival_time, 0.0)
    completion_time = max(now - first, 0.0)
    total_time = max(now - m.arrival_time, 0.0)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.num_cached_tokens,
                                                  image_tokens=image_tokens),
        avg_tok_per_sec=_rate(prompt + completion, total_time),
        avg_prompt_tok_per_sec=_rate(prompt, prompt_time),
        avg_compl_tok_per_sec=_rate(max(completion - len(out.outputs), 0), completion_time),
        total_time_sec=round(total_time, 6),
        total_prompt_time_sec=round(prompt_time, 6),
        total_completion_time_sec=round(completion_time, 6),
    )


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 3) if seconds > 0 else 0.0


def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


def token_text(tokenizer: Tokenizer, token_id: int) -> tuple[str, list[int]]:
    """A token's text and bytes; an id past the tokenizer (padded vocabulary) is ("", [])."""
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def chat_logprobs(tokenizer: Tokenizer, token_ids: Sequence[int],
                  entries: Sequence[dict[int, Logprob]], top: int) -> list[TokenLogprob]:
    out = []
    for token_id, entry in zip(token_ids, entries):
        text, raw = token_text(tokenizer, token_id)
        ranked = sorted((lp.rank or 0, tid, lp.logprob) for tid, lp in entry.items()
                        if lp.rank is not None and lp.rank <= top)
        tops = []
        for _, tid, value in ranked[:top]:
            t, b = token_text(tokenizer, tid)
            tops.append(TopLogprob(t, value, b))
        out.append(TokenLogprob(text, entry[token_id].logprob, raw, tops))
    return out


def sse(payload: Any) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def sse_error(exc: APIError) -> bytes:
    return sse(ErrorResponse(ErrorInfo(exc.message, exc.body().error.type, exc.param,
                                       exc.code)))
