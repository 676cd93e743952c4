"""OpenAI-shaped errors: the exception handlers raise, and the JSON body clients get."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web


REQUEST_ID_HEADER = "X-Request-Id"
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
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
    path = match.group(1) if match else ""
    param = path.split("[")[0] or None
    # a field missing or unknown inside an object is named with its path: response_format.json_schema.name
    missing = re.search(r"missing required field `([^`]*)`", text)
    if missing:
        field = f"{path}.{missing.group(1)}" if path else missing.group(1)
        return ApiError(400, f"Missing required parameter: {field!r}", field)
    unknown = re.search(r"unknown field `([^`]*)`", text)
    if unknown:
        field = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        return ApiError(400, f"Unsupported parameter: {field!r}", field, "unsupported_parameter")
    if param == "response_format.type":
        return ApiError(400, f"response_format.type must be 'text', 'json_object' or 'json_schema': "
                             f"{text.split(' - at ')[0]}", param)
    message = text.split(" - at ")[0]
    if param:
        message = f"Invalid value for {param!r}: {message}"
    return ApiError(400, message, param)
