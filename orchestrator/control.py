"""The orchestrator's client of the engine worker's control socket: GetStats and SetLimits,
request/reply matched by rid, every wait bounded. Reconnects on the next call after the
worker restarts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared import protocol as p
from shared.framing import FrameConnection


class ControlUnavailable(Exception):
    """The engine worker's control socket cannot be reached (loading, restarting or gone)."""


class _Connection(FrameConnection[p.WorkerMessage]):
    def __init__(self) -> None:
        super().__init__(p.WorkerMessage)
        self.welcome: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()
        self.replies: dict[int, asyncio.Future[Any]] = {}
        self.gone = False

    def on_message(self, msg: p.WorkerMessage) -> None:
        match msg:
            case p.EngineStats(rid=rid) | p.LimitsSet(rid=rid) | p.Failure(rid=rid):
                fut = self.replies.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            case p.Welcome():
                if not self.welcome.done():
                    self.welcome.set_result(msg)
            case p.HandshakeRefused(message=message):
                if not self.welcome.done():
                    self.welcome.set_exception(ControlUnavailable(f"handshake refused: {message}"))

    def on_lost(self, exc: Exception | None) -> None:
        self.gone = True
        error = ControlUnavailable("the engine worker closed the control socket")
        if not self.welcome.done():
            self.welcome.set_exception(error)
        for fut in self.replies.values():
            if not fut.done():
                fut.set_exception(error)
        self.replies.clear()


class ControlClient:
    def __init__(self, socket_path: Path, timeout_s: float = 2.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.engine_pid = 0
        self._conn: _Connection | None = None
        self._rids = itertools.count(1)

    async def _connection(self) -> _Connection:
        if self._conn is not None and not self._conn.gone:
            return self._conn
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout_s):
                _, conn = await loop.create_unix_connection(_Connection, str(self.socket_path))
                conn.send(p.Hello(p.PROTOCOL_VERSION, "orchestrator"))
                welcome = await conn.welcome
        except (OSError, TimeoutError) as exc:
            raise ControlUnavailable(f"{self.socket_path}: {exc or 'timed out'}") from None
        self.engine_pid = welcome.engine_pid
        self._conn = conn
        return conn

    async def _ask(self, make: Callable[[int], Any]) -> Any:
        conn = await self._connection()
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.replies[rid] = fut
        conn.send(make(rid))
        try:
            async with asyncio.timeout(self.timeout_s):
                reply = await fut
        except TimeoutError:
            raise ControlUnavailable(f"no reply within {self.timeout_s:g} s") from None
        finally:
            conn.replies.pop(rid, None)
        if isinstance(reply, p.Failure):
            raise ControlUnavailable(reply.message)
        return reply

    async def stats(self, window_s: float) -> p.EngineStats:
        return await self._ask(lambda rid: p.GetStats(rid, window_s))  # type: ignore[no-any-return]

    async def set_limits(self, max_num_seqs: int, max_num_batched_tokens: int, reason: str) -> p.LimitsSet:
        return await self._ask(  # type: ignore[no-any-return]
            lambda rid: p.SetLimits(rid, max_num_seqs, max_num_batched_tokens, reason))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
