"""``/openapi.json`` from the msgspec Structs the routes really decode and encode."""

from __future__ import annotations

from typing import Any

import msgspec
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from caldera.api import protocol as p

_REF = "#/components/schemas/{name}"

# path -> (request Struct or None, response Struct, streams SSE chunks of this Struct or None)
_ROUTES: dict[tuple[str, str], tuple[Any, Any, Any]] = {
    ("/v1/chat/completions", "post"): (p.ChatCompletionRequest, p.ChatCompletion,
                                       p.ChatCompletionChunk),
    ("/v1/completions", "post"): (p.CompletionRequest, p.Completion, p.Completion),
    ("/v1/models", "get"): (None, p.ModelList, None),
    ("/v1/models/{model_id}", "get"): (None, p.ModelCard, None),
    ("/tokenize", "post"): (p.TokenizeRequest, p.TokenizeResponse, None),
    ("/detokenize", "post"): (p.DetokenizeRequest, p.DetokenizeResponse, None),
}


def _ref(struct: Any) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI-compatible API of Caldera.")
    structs = {s for route in _ROUTES.values() for s in route if s is not None}
    structs.add(p.ErrorResponse)
    _, components = msgspec.json.schema_components(sorted(structs, key=lambda s: s.__name__),
                                                   ref_template=_REF)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
    paths = schema.setdefault("paths", {})
    for (path, method), (request, response, chunk) in _ROUTES.items():
        op = paths.setdefault(path, {}).setdefault(method, {})
        if request is not None:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": _ref(request)}}}
        content: dict[str, Any] = {"application/json": {"schema": _ref(response)}}
        if chunk is not None:
            content["text/event-stream"] = {
                "schema": _ref(chunk),
                "description": "with stream: true, one `data: <chunk>` event per chunk, then "
                               "`data: [DONE]`",
            }
        op["responses"] = {
            "200": {"description": "OK", "content": content},
            "default": {"description": "error",
                        "content": {"application/json": {"schema": _ref(p.ErrorResponse)}}},
        }
    app.openapi_schema = schema
    return schema
