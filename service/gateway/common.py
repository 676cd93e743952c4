"""What the generation handlers share: body decoding, model check, sampling parameters,
engine error mapping, and server-sent events."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from service.gateway import schemas as s
from shared.engine_client import DeadlineExceeded, EngineUnavailable, RequestFailed
from service.gateway.errors import ApiError, error_body, from_validation
from service.gateway.keys import CLIENT, CONFIG, DRAINING, HEALTH, RECORD, REQUEST_ID
from service.gateway.request_record import RequestRecord, request_record
from service.gateway.sse import ClientStalled, EventStream
from shared import protocol as p

T = TypeVar("T")
encode = msgspec.json.Encoder().encode
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_DONE = b"data: [DONE]\n\n"
ENGINE_ERRORS = (RequestFailed, DeadlineExceeded, EngineUnavailable)
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def sse(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


def engine_gate(request: web.Request) -> None:
    """What every route that sends work to the engine passes first (routes.py applies it from
    the route table, before the body is read): 503 while draining or while the engine is
    stalled. Whether there is room is the engine's admission's to say (one place, one
    definition of waiting: service/engine/admission.py)."""
    if request.app[DRAINING].is_set():
        raise ApiError(503, "The service is shutting down", code="draining", headers={"Retry-After": "5"})
    if request.app[HEALTH].stalled:
        raise ApiError(503, "The engine has stalled; it is being watched and restarted",
                       code="engine_unavailable", headers={"Retry-After": "5"})


async def decode_body(request: web.Request, kind: type[T]) -> T:
    """The JSON body as `kind`; 400 naming the field when it is wrong."""
    ctype = request.headers.get("Content-Type", "application/json")
    if not ctype.lower().startswith("application/json"):
        raise ApiError(400, f"Content-Type must be application/json, not {ctype!r}", code="invalid_content_type")
    timeout_s = request.app[CONFIG].client_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            body = await request.read()  # bounded by client_max_size: 413 beyond it
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None
    except (RequestPayloadError, HttpProcessingError) as exc:  # a corrupt compressed or chunked body
        raise ApiError(400, f"The request body could not be read: {str(exc).split('message:')[-1].strip()}",
                       code="invalid_body") from None
    if not body:
        raise ApiError(400, "The request body is empty; a JSON object is expected")
    decoder = _decoders.get(kind) or _decoders.setdefault(kind, msgspec.json.Decoder(kind))
    try:
        return decoder.decode(body)  # type: ignore[no-any-return]
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise from_validation(exc) from None
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body's JSON is nested too deeply", code="invalid_json") from None


def check_model(request: web.Request, model: str | None) -> str:
    config = request.app[CONFIG]
    if model is None:
        return config.served_model_name
    if model not in config.served_names:
        raise ApiError(404, f"The model {model!r} does not exist; this service serves "
                            f"{' or '.join(map(repr, config.served_names))}", "model", "model_not_found")
    return model


def sampling_spec(req: s.SamplingFields, max_tokens: int | None, logprobs: int | None) -> p.SamplingSpec:
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token <= s.INT64_MAX:
            raise ApiError(400, f"logit_bias keys must be token ids, not {key[:40]!r}", "logit_bias")
        bias.append((token, value))
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    return p.SamplingSpec(
        max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
        n=req.n, seed=req.seed, stop=stop, stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
        min_tokens=req.min_tokens, min_p=req.min_p, logprobs=logprobs, logit_bias=bias,
        response_format=structured_output(req.response_format),
    )


def usage_options(req: s.SamplingFields) -> tuple[bool, bool]:
    """(a usage event before [DONE], usage on every chunk): vLLM's continuous_usage_stats
    counts only with include_usage, as vLLM's server has it."""
    opts = req.stream_options
    include = opts is not None and opts.include_usage
    return include, include and opts is not None and opts.continuous_usage_stats


def structured_output(fmt: s.ResponseFormat | None) -> p.StructuredOutput | None:
    """OpenAI's response_format as the engine's constraint; whether the schema compiles is
    vLLM's to say (the engine worker's 400 names response_format.json_schema.schema)."""
    match fmt:
        case s.JsonObjectFormat():
            return p.StructuredOutput(None)
        case s.JsonSchemaFormat(json_schema=spec):
            if spec.schema is None:
                raise ApiError(400, "response_format.json_schema.schema is required: the JSON Schema the "
                                    "answer must satisfy", "response_format.json_schema.schema")
            return p.StructuredOutput(encode(spec.schema).decode())
        case _:
            return None


async def complete(request: web.Request, prompts: Sequence[str | list[int]], params: p.SamplingSpec,
                   **kwargs: Any) -> list[p.Output]:
    """The engine's final output per prompt, under the request's deadline; engine errors
    as OpenAI errors."""
    try:
        return await request.app[CLIENT].complete(prompts, params, request[REQUEST_ID],
                                                  request.app[CONFIG].request_timeout_s, **kwargs)
    except ENGINE_ERRORS as exc:
        raise engine_error(exc) from None


def stream(request: web.Request, prompts: Sequence[str | list[int]], params: p.SamplingSpec,
           **kwargs: Any) -> AsyncIterator[tuple[int, p.Output]]:
    """The engine's deltas per prompt, under the request's deadline (ENGINE_ERRORS raised)."""
    return request.app[CLIENT].stream(prompts, params, request[REQUEST_ID], request.app[CONFIG].request_timeout_s,
                                      **kwargs)


def engine_error(exc: Exception) -> ApiError:
    if isinstance(exc, RequestFailed):
        f = exc.failure
        headers = {"Retry-After": str(max(1, math.ceil(f.retry_after_s)))} if f.status == 429 else None
        return ApiError(f.status, f.message, f.param, f.code, headers)
    if isinstance(exc, (DeadlineExceeded, TimeoutError)):  # TimeoutError: a tokenize call's own deadline
        return ApiError(504, f"Request deadline exceeded: {exc or 'no answer in time'}", code="timeout")
    return ApiError(503, f"The engine is unavailable: {exc}", code="engine_unavailable",
                    headers={"Retry-After": "1"})


def finish(reason: p.FinishReason | None) -> Any:
    return None if reason is None else reason.openai


async def start_sse(request: web.Request, request_id: str) -> EventStream:
    response = web.StreamResponse(headers=SSE_HEADERS)
    response.headers["X-Request-Id"] = request_id
    try:
        await response.prepare(request)
    except ConnectionResetError:
        raise ClientStalled(response, "the client closed the connection") from None
    return EventStream(request, response, request.app[CONFIG].client_timeout_s)


async def relay_stream(request: web.Request, deltas: AsyncIterator[tuple[int, p.Output]],
                       events_of: Callable[[int, p.Output], list[bytes]],
                       usage_event: Callable[[s.Usage], bytes] | None) -> web.StreamResponse:
    """The one stream loop of the generation routes: the engine's deltas out as server-sent
    events (`events_of` renders a delta of prompt `index`), counted
    for the log line and the metrics; an error before the first event is a plain JSON
    error, after it an error event; then the usage event if asked, and [DONE]."""
    events: EventStream | None = None
    record = request[RECORD] = RequestRecord()
    finals: list[p.Output] = []
    try:
        async for index, out in deltas:
            if events is None:
                events = await start_sse(request, request[REQUEST_ID])
            record.completion_tokens += sum(c.tokens for c in out.choices)
            if out.finished:  # every message carries the prompt's tokens: counted once, at the end
                record.prompt_tokens += out.prompt_tokens
                finals.append(out)
            for event in events_of(index, out):
                await events.send(event)
    except ENGINE_ERRORS as exc:
        return await end_stream_with_error(events, exc)
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    assert events is not None  # every prompt ends with a final delta or an error
    return await end_stream(events, record, finals, usage_event)


async def end_stream_with_error(events: EventStream | None, exc: Exception) -> web.StreamResponse:
    """Before the first event the error is a plain JSON response; after it, an error event
    and the end of the stream."""
    err = engine_error(exc)
    if events is None:
        raise err from None
    await events.send(sse(error_body(err.status, err.message, err.param, err.code)))
    await events.send(SSE_DONE)
    return events.response


async def end_stream(events: EventStream, record: RequestRecord, finals: list[p.Output],
                     usage_event: Callable[[s.Usage], bytes] | None) -> web.StreamResponse:
    """Timing for the log line and metrics, the usage event if asked, then [DONE]."""
    full = request_record(finals, record.prompt_tokens, record.completion_tokens)
    record.ttft_s, record.itl_s = full.ttft_s, full.itl_s
    if usage_event is not None:
        total = record.prompt_tokens + record.completion_tokens
        await events.send(usage_event(s.Usage(record.prompt_tokens, record.completion_tokens, total)))
    await events.send(SSE_DONE)
    await events.close()
    return events.response
