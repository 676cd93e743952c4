"""The gateway's one middleware: request id, error mapping, metrics, and one log line per request."""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from service.gateway.errors import REQUEST_ID_HEADER, ApiError, error_response
from service.gateway.keys import CONFIG, METRICS, RECORD, REQUEST_ID
from service.gateway.sse import ClientStalled
from shared.logging import bind_request_id, get_logger

log = get_logger("citadel.request")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection
_QUIET_ROUTES = frozenset({"/health", "/metrics"})  # polled often: counted, not logged


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given[:128] if given and given.isascii() and given.isprintable() else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    bind_request_id(request_id)  # on every line logged while this request is handled
    status = 500
    metrics = request.app[METRICS]
    metrics.in_flight.inc({})
    counted = request.path not in _QUIET_ROUTES
    metrics.handling += counted
    try:
        response = await _handle(request, handler, request_id, bad_id=given is not None and given[:128] != request_id)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = CLIENT_CLOSED  # the client went away; its request was aborted in the engine
        raise
    except ClientStalled as stalled:
        status = CLIENT_CLOSED  # the client stopped reading or hung up; connection and request aborted
        log.warning("stream aborted", reason=str(stalled))
        return stalled.response  # aiohttp finds its connection closed and lets it go
    finally:
        metrics.in_flight.dec({})
        metrics.handling -= counted
        elapsed = time.perf_counter() - started
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        record = request.get(RECORD)
        metrics.observe(endpoint, status, elapsed, record)
        if request.path not in _QUIET_ROUTES:
            fields = {"method": request.method, "route": endpoint,
                      "status": status, "e2e_ms": round(elapsed * 1000, 1)}
            if record is not None:
                fields.update(prompt_tokens=record.prompt_tokens, generated_tokens=record.completion_tokens,
                              ttft_ms=round(record.ttft_s * 1000, 1))
            log.info("request", **fields)


def check_api_key(key: str, request: web.Request) -> None:
    """Deny by default when a key is configured: every route but /health needs it, on both
    ports. The scheme is case-insensitive (RFC 7235)."""
    if not key or request.path == "/health":
        return
    given = request.headers.get("Authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "Missing or invalid API key: send Authorization: Bearer <key>",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _handle(request: web.Request, handler: Handler, request_id: str, bad_id: bool) -> web.StreamResponse:
    try:
        if bad_id:  # it travels in logs, headers and the engine's protocol: text only
            raise ApiError(400, f"{REQUEST_ID_HEADER} must be printable ASCII text (this answer's id is {request_id})",
                           REQUEST_ID_HEADER, "invalid_request_id")
        check_api_key(request.app[CONFIG].api_key, request)
        response = await handler(request)
    except ApiError as err:
        if err.code in ("engine_unavailable", "draining", "timeout", "overloaded", "rate_limit_exceeded"):
            reason = "deadline" if err.code == "timeout" else err.code
            request.app[METRICS].refused.inc({"reason": reason})
        return error_response(err, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = exc.status
        messages = {
            404: f"Not found: {request.path}",
            405: f"Method {request.method} not allowed on {request.path}",
            413: f"Request body too large (limit {request.app[CONFIG].max_body_bytes} bytes)",
        }
        return error_response(ApiError(status, messages.get(status, exc.reason)), request_id)
    except ClientStalled:
        raise
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(ApiError(500, f"Internal server error (request id {request_id})"), request_id)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


