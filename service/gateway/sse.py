"""Server-sent events out to a client that may stop reading: each write of a stream must
drain within `client_timeout_s`, or the connection is aborted and the request aborted in
the engine (`ClientStalled`, a 499 in the log and the metrics)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from aiohttp import web


class ClientStalled(Exception):
    """The client stopped reading a stream, or closed its connection: the stream is over
    (a 499 in the log and the metrics) and its request is aborted in the engine."""

    def __init__(self, response: web.StreamResponse, reason: str = "the client stopped reading") -> None:
        super().__init__(reason)
        self.response = response


class EventStream:
    """A prepared streaming response whose every write must drain within `stall_s`."""

    __slots__ = ("request", "response", "stall_s")

    def __init__(self, request: web.Request, response: web.StreamResponse, stall_s: float) -> None:
        self.request, self.response, self.stall_s = request, response, stall_s

    async def send(self, data: bytes) -> None:
        await self._within_stall(self.response.write(data))

    async def close(self) -> None:
        await self._within_stall(self.response.write_eof())

    async def _within_stall(self, write: Awaitable[None]) -> None:
        try:
            async with asyncio.timeout(self.stall_s):
                await write
        except TimeoutError:
            transport = self.request.transport
            if transport is not None:
                transport.abort()  # close() would wait for the full buffer to drain
            raise ClientStalled(self.response) from None
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError too: the client hung up
            raise ClientStalled(self.response, "the client closed the connection") from None
