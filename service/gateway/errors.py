"""OpenAI-shaped errors and the one middleware that maps every failure to a response."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from service.gateway.keys import CONFIG
from shared.logging import get_logger

log = get_logger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_KEY = "request_id"
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
          504: "timeout_error"}
_PATH = re.compile(r"at `\$\.?([^`]*)`")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class _ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _Error(msgspec.Struct):
    error: _ErrorBody


_encode = msgspec.json.Encoder().encode


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return _encode(_Error(_ErrorBody(message, err_type, param, code)))


def error_response(err: ApiError, request_id: str = "") -> web.Response:
    headers = dict(err.headers)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return web.Response(status=err.status, body=error_body(err.status, err.message, err.param, err.code),
                        content_type="application/json", headers=headers)


def from_validation(exc: msgspec.ValidationError | msgspec.DecodeError) -> ApiError:
    """`Expected int >= 1, got 0 - at $.max_tokens` -> 400 naming max_tokens."""
    text = str(exc)
    match = _PATH.search(text)
    param = match.group(1) if match else None
    if param is not None:
        param = param.split("[")[0] or None
    missing = re.search(r"missing required field `([^`]*)`", text)
    if missing:
        return ApiError(400, f"Missing required parameter: {missing.group(1)!r}", missing.group(1))
    unknown = re.search(r"unknown field `([^`]*)`", text)
    if unknown:
        param = unknown.group(1)
        return ApiError(400, f"Unsupported parameter: {param!r}", param, "unsupported_parameter")
    message = text.split(" - at ")[0]
    if param:
        message = f"Invalid value for {param!r}: {message}"
    return ApiError(400, message, param)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    request_id = request_id[:128]
    request[REQUEST_ID_KEY] = request_id
    try:
        response = await handler(request)
    except ApiError as err:
        return error_response(err, request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        status = exc.status
        message = {404: f"Not found: {request.path}", 405: f"Method {request.method} not allowed on {request.path}",
                   413: f"Request body too large (limit {request.app[CONFIG].max_body_bytes} bytes)"}.get(status, exc.reason)
        return error_response(ApiError(status, message), request_id)
    except Exception:
        log.exception("unhandled error", request_id=request_id, path=request.path)
        return error_response(ApiError(500, f"Internal server error (request id {request_id})"), request_id)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response
