"""The gateway's `web.AppRunner`, with the deadline aiohttp does not have on its own: the
request head (request line and headers) must arrive within `client_timeout_s` of its first
byte, or the connection is closed, so a client trickling header bytes holds nothing. Idle
keep-alive connections are left to the keep-alive timeout. aiohttp's own protocol-level
refusals are OpenAI's error JSON here too.

The other slow-client deadlines: the body's in `common.decode_body`, each write of a stream
in `sse.EventStream`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from service.gateway.errors import error_body

from shared.logging import get_logger

log = get_logger(__name__)


class _HeadDeadlineHandler(RequestHandler):
    """aiohttp's connection protocol, plus a timer from the first byte of a request head
    to its last."""

    def __init__(self, manager: web.Server, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._head_timeout_s = head_timeout_s
        self._head_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        # Bytes that arrive while no request is parsed or being handled begin a head.
        starts_head = self._head_timer is None and not self._request_in_progress and not self._messages
        super().data_received(data)
        if self._messages:  # a whole head has arrived
            self._cancel_head_timer()
        elif starts_head:
            self._head_timer = self._loop.call_later(self._head_timeout_s, self._head_too_slow)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's own errors (a request it cannot parse: bad method, over-long line,
        malformed header) in OpenAI's error JSON like every other, never echoing the request."""
        plain = super().handle_error(request, status, exc, message)  # logs; raises if a response began
        text = _PROTOCOL_ERRORS.get(type(exc).__name__, "Malformed HTTP request" if status < 500
                                    else "Internal server error")
        response = web.Response(status=status, body=error_body(status, text, code="invalid_http_request"
                                                               if status < 500 else None),
                                content_type="application/json")
        response.force_close()
        del plain
        return response

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._messages or self._request_in_progress or self.transport is None:
            return
        peer = self.transport.get_extra_info("peername")
        log.warning("closed a connection whose request head did not arrive in time",
                    peer=str(peer), client_timeout_s=self._head_timeout_s)
        self.transport.abort()


_PROTOCOL_ERRORS = {
    "BadHttpMethod": "Invalid HTTP method",
    "LineTooLong": "Request line or header too long",
    "BadStatusLine": "Invalid HTTP request line",
    "InvalidHeader": "Invalid HTTP header",
    "InvalidURLError": "Invalid request URL",
    "TransferEncodingError": "Invalid Transfer-Encoding",
    "ContentLengthError": "Invalid Content-Length",
}


class _Server(web.Server):
    def __init__(self, *args: Any, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timeout_s = head_timeout_s

    def __call__(self) -> RequestHandler:
        return _HeadDeadlineHandler(self, loop=self._loop, head_timeout_s=self._head_timeout_s, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections get the head deadline."""

    def __init__(self, app: web.Application, *, head_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._head_timeout_s = head_timeout_s

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()  # runs the app's start-up and freezes it
        return _Server(base.request_handler, request_factory=base.request_factory,
                       handler_cancellation=base.handler_cancellation, loop=asyncio.get_running_loop(),
                       head_timeout_s=self._head_timeout_s, **base._kwargs)
