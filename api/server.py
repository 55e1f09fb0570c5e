"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLM.

Bodies are decoded by msgspec (not pydantic): a type error is a 400 naming the JSON path, and
``/openapi.json`` is built from the same Structs. Every error leaves as the OpenAI error shape;
nothing a client sends becomes a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from caldera.api import serving_chat, serving_completions
from caldera.api.config import ServerConfig
from caldera.api.errors import APIError, bad_request, from_decode_error
from caldera.api.metrics import CONTENT_TYPE, Metrics
from caldera.api.openapi import openapi_schema
from caldera.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from caldera.api.serving import (
    Admission,
    ServingContext,
    client_gone,
    until_done_or_disconnect,
)
from caldera.engine.async_llm import AsyncLLM
from caldera.engine.chat_template import ChatTemplateError
from caldera.engine.config import EngineConfig
from caldera.engine.image_pool import ImagePool

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
T = TypeVar("T")
_encode = msgspec.json.Encoder().encode
UI_PREFIX = "/ui/"


def json_response(payload: Any, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(_encode(payload), status_code=status, headers=headers,
                    media_type="application/json")


def error_response(exc: APIError) -> Response:
    return Response(exc.encode(), status_code=exc.status, headers=exc.headers,
                    media_type="application/json")


async def read_body(request: Request, type_: type[T], limit: int) -> T:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, over the limit of {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes",
                               code="request_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise client_gone() from None
    body = b"".join(chunks)
    if not body:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.DecodeError as exc:
        raise from_decode_error(exc) from None


def create_app(server_config: ServerConfig, engine_config: EngineConfig) -> FastAPI:
    """The app; the engine starts in its lifespan (the port opens once the model is loaded)."""
    metrics = Metrics(server_config.served_model_names[0])
    state: dict[str, ServingContext] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm = await AsyncLLM.start(engine_config, stat_loggers=[metrics])
        http = httpx.AsyncClient()
        images = ImagePool(llm.processor.image_processor.config, server_config.image_workers,
                           server_config.max_image_pixels, server_config.image_cache_bytes)
        state["ctx"] = ServingContext(llm, server_config, metrics, http, images, time.time())
        try:
            yield
        finally:
            await llm.shutdown()
            await http.aclose()
            await asyncio.to_thread(images.shutdown)

    app = FastAPI(title="Caldera", version=VERSION, lifespan=lifespan, docs_url="/docs",
                  redoc_url=None)
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    app.state.metrics = metrics  # also exported to Ray's metrics by a Ray Serve replica
    if server_config.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(server_config.allowed_origins),
                           allow_methods=["*"], allow_headers=["*"])
    _add_error_handlers(app)
    _add_auth(app, server_config)

    def ctx() -> ServingContext:
        if "ctx" not in state:
            raise APIError(503, "the engine is starting", code="engine_starting")
        return state["ctx"]

    limit = server_config.max_body_bytes

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        c = ctx()
        req = await read_body(request, ChatCompletionRequest, limit)
        return await _run(c, request, "chatcmpl",
                          lambda: serving_chat.prepare_chat(c, req),
                          lambda p, rid: serving_chat.stream_response(c, req, p, rid),
                          lambda p, rid: serving_chat.full_response(c, req, p, rid),
                          req.stream)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        c = ctx()
        req = await read_body(request, CompletionRequest, limit)

        async def prepare() -> serving_completions.PreparedCompletion:
            return serving_completions.prepare_completion(c, req)

        return await _run(c, request, "cmpl", prepare,
                          lambda p, rid: serving_completions.stream_response(c, req, p, rid),
                          lambda p, rid: serving_completions.full_response(c, req, p, rid),
                          req.stream)

    @app.get("/v1/models")
    async def list_models() -> Response:
        c = ctx()
        return json_response(ModelList([_card(c, name) for name in
                                        server_config.served_model_names], object="list"))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        c = ctx()
        if model_id not in server_config.served_model_names and model_id != "default":
            names = ", ".join(repr(n) for n in server_config.served_model_names)
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves "
                                f"{names}", param="model", code="model_not_found")
        name = server_config.served_model_names[0] if model_id == "default" else model_id
        return json_response(_card(c, name))

    @app.get("/health")
    async def health() -> Response:
        c = state.get("ctx")
        if c is None or not c.llm.is_healthy:
            reason = c.llm.dead_reason if c is not None else "starting"
            return json_response({"status": "unhealthy", "reason": reason}, 503)
        return json_response({"status": "ok"})

    @app.get("/version")
    async def version() -> Response:
        return json_response({"version": VERSION})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        c = ctx()
        req = await read_body(request, TokenizeRequest, limit)
        serving_chat.check_model(req.model, server_config.served_model_names)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("send exactly one of prompt or messages")
        if req.prompt is not None:
            text = req.prompt
        else:
            try:
                rendered = c.llm.processor.chat_template.render(
                    msgspec.to_builtins(req.messages),
                    add_generation_prompt=req.add_generation_prompt)
            except ChatTemplateError as exc:
                raise bad_request(str(exc), param="messages") from None
            text = rendered.text
        tokens = c.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        return json_response(TokenizeResponse(tokens, len(tokens), c.llm.max_model_len))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        c = ctx()
        req = await read_body(request, DetokenizeRequest, limit)
        serving_chat.check_model(req.model, server_config.served_model_names)
        bad = [t for t in req.tokens if not 0 <= t < c.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the vocabulary "
                              f"(0..{c.vocab_size - 1})", param="tokens")
        return json_response(DetokenizeResponse(c.tokenizer.decode(req.tokens)))

    if server_config.ui:
        from caldera.api.ui import mount_ui

        mount_ui(app)
    return app


def _card(c: ServingContext, name: str) -> ModelCard:
    return ModelCard(id=name, created=int(c.started), owned_by="caldera", object="model",
                     root=c.llm.config.model, max_model_len=c.llm.max_model_len)


async def _run(c: ServingContext, request: Request, prefix: str,
               prepare: Callable[[], Awaitable[Any]],
               stream: Callable[[Any, str], AsyncIterator[bytes]],
               full: Callable[[Any, str], Awaitable[Any]], streaming: bool) -> Response:
    """Admission (429 before any image work), preparation, then the answer."""
    request_id = c.llm.new_request_id(prefix)
    admission = Admission(c).__enter__()
    try:
        prepared = await until_done_or_disconnect(request, prepare())
        if not streaming:
            result = await until_done_or_disconnect(request, full(prepared, request_id))
            return json_response(result)
    except BaseException:
        admission.release()
        raise
    finally:
        if not streaming:
            admission.release()
    return _EventStream(stream(prepared, request_id), admission)


class _EventStream(StreamingResponse):
    """SSE that releases its admission however the response ends (even never started)."""

    def __init__(self, body: AsyncIterator[bytes], admission: Admission) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.admission = admission

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.admission.release()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()  # its request is aborted now, not at garbage collection


def _add_auth(app: FastAPI, config: ServerConfig) -> None:
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)


class APIKeyMiddleware:
    """Bearer-token check on every route but the health probe and the web page's own files
    (the page asks for the key and sends it with its API calls). Plain ASGI, so the request's
    disconnect still reaches the handler (it aborts the generation)."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or self._open(scope["path"]):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):
            await self.app(scope, receive, send)
            return
        response = error_response(APIError(
            401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        await response(scope, receive, send)

    @staticmethod
    def _open(path: str) -> bool:
        return path == "/health" or path == "/" or path.startswith(UI_PREFIX)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"method {request.method} is not allowed on {request.url.path}"}
        return error_response(APIError(exc.status_code,
                                       message.get(exc.status_code, str(exc.detail))))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}",
                                       code="internal_error"))
