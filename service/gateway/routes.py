"""Every HTTP route in one table: the app is wired from it, and the OpenAPI document is
generated from it and the msgspec schemas, so neither can drift from the code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from service.gateway import chat, completions, efficiency, handlers
from service.gateway import schemas as s
from service.gateway.common import engine_gate

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    request: type | None = None  # the JSON body's type
    response: type | None = None  # the 200 body's type (JSON)
    streams: type | None = None  # the type of each server-sent event when "stream": true
    engine: bool = False  # sends work to the engine: passes common.engine_gate first


ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/completions", completions.completions, "Text completion (OpenAI)",
          s.CompletionRequest, s.Completion, s.Completion, engine=True),
    Route("POST", "/v1/chat/completions", chat.chat_completions, "Chat completion with Phi-3's chat template",
          s.ChatCompletionRequest, s.ChatCompletion, s.ChatCompletionChunk, engine=True),
    Route("GET", "/v1/models", handlers.models, "The served model names", None, s.ModelList),
    Route("GET", "/v1/models/{model}", handlers.model_info, "One model with engine details"),
    Route("POST", "/tokenize", handlers.tokenize, "Token ids of a prompt or chat", s.TokenizeRequest,
          s.TokenizeResponse, engine=True),
    Route("POST", "/detokenize", handlers.detokenize, "Text of token ids", s.DetokenizeRequest,
          s.DetokenizeResponse, engine=True),
    Route("GET", "/health", handlers.health, "Readiness: 200 only when the engine serves", None, s.Health),
    Route("GET", "/version", handlers.version, "Versions of the service and its engine", None, s.Version),
    Route("GET", "/efficiency", efficiency.efficiency,
          "Admission limits, measurements, throughput, latency against the target, refusals, decisions"),
    Route("GET", "/metrics/efficiency", efficiency.efficiency_metrics, "/efficiency in Prometheus text format"),
)

ERROR_STATUSES = {"400": "Bad input (names the field)", "404": "Unknown model or route",
                  "413": "Body too large", "429": "Too many requests waiting (Retry-After)", "503": "Engine unavailable or draining", "504": "Deadline passed"}


def add_routes(app: web.Application) -> None:
    for route in ROUTES:
        handler = _gated(route.handler) if route.engine else route.handler
        app.router.add_route(route.method, route.path.replace("{model}", "{model:.+}"), handler)
    app.router.add_get("/openapi.json", openapi_handler)


def _gated(handler: Handler) -> Handler:
    async def gated(request: web.Request) -> web.StreamResponse:
        engine_gate(request)
        return await handler(request)

    return gated


def openapi_document() -> dict[str, Any]:
    types = {t for r in ROUTES for t in (r.request, r.response, r.streams) if t is not None} | {s.ErrorResponse}
    ordered = sorted(types, key=lambda t: t.__name__)
    (schemas_list, components) = msgspec.json.schema_components(ordered, ref_template="#/components/schemas/{name}")
    refs = dict(zip(ordered, schemas_list))
    error_ref = {"content": {"application/json": {"schema": refs[s.ErrorResponse]}}}
    paths: dict[str, Any] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"summary": route.summary, "operationId": route.handler.__name__}
        if "{model}" in route.path:
            op["parameters"] = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if route.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[route.request]}}}
        ok: dict[str, Any] = {"description": "OK"}
        content: dict[str, Any] = {}
        if route.response is not None:
            content["application/json"] = {"schema": refs[route.response]}
        else:
            content["application/json"] = {"schema": {"type": "object"}}
        if route.streams is not None:
            content["text/event-stream"] = {"schema": {"type": "string"},
                                            "x-event-schema": refs[route.streams]}
        ok["content"] = content
        responses: dict[str, Any] = {"200": ok}
        for status, text in ERROR_STATUSES.items():
            if status == "413" and route.request is None:
                continue
            responses[status] = {"description": text, **error_ref}
        op["responses"] = responses
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "citadel-llm", "version": "0.1.0",
                 "description": "OpenAI-compatible serving of Phi-3-mini-4k-instruct on vLLM"},
        "paths": paths,
        "components": {"schemas": components},
    }


_document_bytes: bytes | None = None


async def openapi_handler(request: web.Request) -> web.Response:
    global _document_bytes
    if _document_bytes is None:
        _document_bytes = msgspec.json.encode(openapi_document())
    return web.Response(body=_document_bytes, content_type="application/json")
