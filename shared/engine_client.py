"""The one client of the engine worker's sockets, for every process that talks to it: the
gateway (generation, tokenizing, stats on `engine.sock`), the orchestrator (stats and limits
on `control.sock`) and `Phi3MiniService.get_model_info()` (a handshake, through the
blocking `handshake()`).

One Unix-socket connection at a time, kept up by one owned task that reconnects with
backoff; every request is multiplexed on it by rid. Frames are dispatched synchronously
from the protocol's `data_received` to a per-request future (one answer) or queue (a
stream). The waiters belong to their connection: when it drops, they, and only they, get
`EngineUnavailable` at once. A handshake that does not complete in time closes its
connection. Every wait is bounded by the caller's timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from shared import protocol as p
from shared.framing import FrameConnection
from shared.logging import get_logger

log = get_logger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
# Deltas of one streamed request waiting for its client to take them (the kernel's socket
# buffers hold far more before any wait here): beyond this the reader is not reading, and
# the request is aborted in the engine, so that a stalled reader costs a bounded amount.
STREAM_BACKLOG = 64
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 2.0


class EngineUnavailable(Exception):
    """The engine worker is not connected (loading, restarting or dead)."""


class RequestFailed(Exception):
    """The worker ended this request with an error."""

    def __init__(self, failure: p.Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class DeadlineExceeded(Exception):
    """The request passed its deadline and was aborted in the engine."""


_Sink = asyncio.Future | asyncio.Queue


class _Connection(FrameConnection[p.WorkerMessage]):
    def __init__(self, client: EngineClient) -> None:
        super().__init__(p.WorkerMessage)
        self.client = client
        self.welcome: asyncio.Future[p.Welcome] = asyncio.get_running_loop().create_future()
        self.lost = asyncio.Event()
        self.sinks: dict[int, _Sink] = {}  # the requests waiting on this connection, by rid

    def on_message(self, msg: p.WorkerMessage) -> None:
        match msg:
            case p.Output(rid=rid) | p.Failure(rid=rid):
                self.client._deliver(self, rid, msg)
            case p.EngineStats(rid=rid) | p.TokenizeResult(rid=rid) | p.LimitsSet(rid=rid):
                sink = self.sinks.pop(rid, None)
                if isinstance(sink, asyncio.Future) and not sink.done():
                    sink.set_result(msg)
            case p.Welcome():
                if not self.welcome.done():
                    self.welcome.set_result(msg)
            case p.HandshakeRefused(message=message):
                if not self.welcome.done():
                    self.welcome.set_exception(EngineUnavailable(f"handshake refused: {message}"))

    def on_lost(self, exc: Exception | None) -> None:
        if not self.welcome.done():
            self.welcome.set_exception(EngineUnavailable("connection lost during handshake"))
        self.lost.set()
        self.fail_all(EngineUnavailable("the engine worker went away"))
        self.client._on_lost(self)

    def fail_all(self, exc: Exception) -> None:
        sinks, self.sinks = self.sinks, {}
        for sink in sinks.values():
            if isinstance(sink, asyncio.Queue):
                sink.put_nowait(exc)
            elif not sink.done():
                sink.set_exception(exc)


class EngineClient:
    """A client of one of the engine worker's sockets (`role` says which side it is)."""

    def __init__(self, socket_path: Path, role: str = "gateway",
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S) -> None:
        self.socket_path, self.role, self.handshake_timeout_s = socket_path, role, handshake_timeout_s
        self.info: p.Welcome | None = None  # set while connected and greeted
        self.ever_connected = False
        self.engine_restarts = 0  # handshakes with a new engine process after the first
        self._last_engine_pid = 0
        # Outputs and failures delivered to requests, ever: output arriving is progress, whatever
        # else is slow (the health probe reads it)
        self.outputs_received = 0
        self._conn: _Connection | None = None
        self._rids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep_connected(), name=f"{self.role}-connector")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn, self.info = self._conn, None, None
        if conn is not None:
            conn.fail_all(EngineUnavailable("the client is shutting down"))
            conn.close()

    @property
    def pending(self) -> int:
        """Requests waiting for the engine."""
        return len(self._conn.sinks) if self._conn is not None else 0

    @property
    def ready(self) -> bool:
        return self.info is not None

    async def connect(self) -> p.Welcome:
        """One connection and handshake, within handshake_timeout_s; a connection whose
        handshake fails or times out is closed. EngineUnavailable when it cannot be had."""
        loop = asyncio.get_running_loop()
        conn: _Connection | None = None
        try:
            async with asyncio.timeout(self.handshake_timeout_s):
                _, conn = await loop.create_unix_connection(lambda: _Connection(self), str(self.socket_path))
                conn.send(p.Hello(p.PROTOCOL_VERSION, self.role))
                info = await conn.welcome
        except (OSError, EngineUnavailable, TimeoutError) as exc:
            if conn is not None:
                conn.close()
            why = str(exc) or f"no handshake within {self.handshake_timeout_s:g} s"
            raise EngineUnavailable(f"{self.socket_path}: {why}") from None
        self._conn, self.info = conn, info
        if self._last_engine_pid and info.engine_pid != self._last_engine_pid:
            self.engine_restarts += 1
        self._last_engine_pid = info.engine_pid
        self.ever_connected = True
        return info

    async def _keep_connected(self) -> None:
        delay = RECONNECT_MIN_S
        while True:
            try:
                info = await self.connect()
            except EngineUnavailable as exc:
                if self.ever_connected or delay >= RECONNECT_MAX_S:
                    log.debug("engine not reachable yet", socket=str(self.socket_path), error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            delay = RECONNECT_MIN_S
            log.info("engine connected", role=self.role, engine_pid=info.engine_pid,
                     load_seconds=info.load_seconds, demo_model=info.demo_model)
            conn = self._conn
            assert conn is not None
            await conn.lost.wait()
            log.warning("engine connection lost; reconnecting", role=self.role)

    def _on_lost(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            self.info = None

    def fail_in_flight(self, exc: Exception) -> None:
        """Answer every waiting request with `exc` and abort it in the engine."""
        conn = self._conn
        if conn is None:
            return
        rids = list(conn.sinks)
        conn.fail_all(exc)
        for rid in rids:
            conn.send(p.Abort(rid))

    def _deliver(self, conn: _Connection, rid: int, msg: p.Output | p.Failure) -> None:
        self.outputs_received += 1
        sinks = conn.sinks
        sink = sinks.get(rid)
        if sink is None:
            return  # aborted already
        if isinstance(sink, asyncio.Queue):
            if sink.qsize() >= STREAM_BACKLOG and not isinstance(msg, p.Failure):
                self._abort(conn, [r for r, s in sinks.items() if s is sink])  # all prompts of the request
                sink.put_nowait(RequestFailed(p.Failure(
                    rid, 408, f"The client did not read the stream: more than {STREAM_BACKLOG} events waited for it; "
                              "the request was aborted", code="client_too_slow")))
                return
            sink.put_nowait(msg)
            if isinstance(msg, p.Failure) or msg.finished:
                del sinks[rid]
        else:
            del sinks[rid]
            if not sink.done():
                if isinstance(msg, p.Failure):
                    sink.set_exception(RequestFailed(msg))
                else:
                    sink.set_result(msg)

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None or self.info is None:
            raise EngineUnavailable("the engine is not connected")
        return conn

    async def _ask(self, make: Callable[[int], p.GatewayMessage], timeout_s: float) -> Any:
        """One request/reply exchange; EngineUnavailable, TimeoutError or RequestFailed."""
        conn = self._connection()
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.send(make(rid))  # first: a message that cannot be encoded registers nothing
        conn.sinks[rid] = fut  # the reply cannot arrive before this: it is read on this loop
        try:
            reply = await asyncio.wait_for(fut, timeout_s)
        finally:
            if conn.sinks.pop(rid, None) is not None:
                conn.send(p.Abort(rid))  # no one waits for it any more (timeout or cancel)
        return reply

    async def stats(self, timeout_s: float, window_s: float = 10.0) -> p.EngineStats:
        """The engine's current state; latency percentiles over the last window_s."""
        return await self._ask(lambda rid: p.GetStats(rid, window_s), timeout_s)  # type: ignore[no-any-return]

    async def set_limits(self, max_num_seqs: int, max_num_batched_tokens: int, reason: str,
                         timeout_s: float) -> p.LimitsSet:
        """Move the admission limits (the control socket only)."""
        return await self._ask(  # type: ignore[no-any-return]
            lambda rid: p.SetLimits(rid, max_num_seqs, max_num_batched_tokens, reason), timeout_s)

    async def tokenize(self, text: str | None, chat: list[p.ChatMessage] | None, add_special_tokens: bool,
                       timeout_s: float, add_generation_prompt: bool = True) -> p.TokenizeResult:
        return await self._ask(  # type: ignore[no-any-return]
            lambda rid: p.Tokenize(rid, text, chat, add_special_tokens, add_generation_prompt), timeout_s)

    async def detokenize(self, tokens: list[int], timeout_s: float) -> p.TokenizeResult:
        return await self._ask(lambda rid: p.Detokenize(rid, tokens), timeout_s)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- requests
    def _submit(self, conn: _Connection, prompt: str | list[int], params: p.SamplingSpec, stream: bool,
                request_id: str, sink: _Sink, echo: bool, chat: list[p.ChatMessage] | None,
                probe: bool = False) -> int:
        rid = next(self._rids)
        conn.send(p.Generate(rid, prompt, params, stream, request_id, chat, echo, probe))  # first: see _ask
        conn.sinks[rid] = sink
        return rid

    @staticmethod
    def _abort(conn: _Connection, rids: Sequence[int]) -> None:
        for rid in rids:
            if conn.sinks.pop(rid, None) is not None:
                conn.send(p.Abort(rid))  # a lost connection sends nothing: its requests are gone with it

    async def complete(self, prompts: Sequence[str | list[int]], params: p.SamplingSpec, request_id: str,
                       timeout_s: float, echo: bool = False,
                       chat: list[p.ChatMessage] | None = None, probe: bool = False) -> list[p.Output]:
        """One final Output per prompt, in order. probe: the health probe (see protocol.Generate)."""
        loop = asyncio.get_running_loop()
        conn = self._connection()
        futures: list[asyncio.Future[p.Output]] = []
        rids: list[int] = []
        try:
            for prompt in prompts:
                fut = loop.create_future()
                rids.append(self._submit(conn, prompt, params, False, request_id, fut, echo, chat, probe))
                futures.append(fut)
            async with asyncio.timeout(timeout_s):
                if len(futures) == 1:
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {timeout_s:g} s") from None
        finally:
            # a cancelled wait cancels its future too: those requests still run in the engine
            self._abort(conn, [rid for rid, fut in zip(rids, futures) if not fut.done() or fut.cancelled()])
            for fut in futures:  # gather leaves sibling failures unretrieved
                if fut.done() and not fut.cancelled():
                    fut.exception()

    async def stream(self, prompts: Sequence[str | list[int]], params: p.SamplingSpec, request_id: str,
                     timeout_s: float, echo: bool = False,
                     chat: list[p.ChatMessage] | None = None) -> AsyncIterator[tuple[int, p.Output]]:
        """Yield (prompt index, Output delta) until every prompt's stream has finished."""
        queue: asyncio.Queue[p.Output | p.Failure | Exception] = asyncio.Queue()
        conn = self._connection()
        rids: list[int] = []
        open_rids: set[int] = set()
        try:
            for prompt in prompts:
                rid = self._submit(conn, prompt, params, True, request_id, queue, echo, chat)
                rids.append(rid)
                open_rids.add(rid)
            index_of = {rid: i for i, rid in enumerate(rids)}
            # The deadline covers only the waits here, never the consumer's own writes.
            deadline = asyncio.get_running_loop().time() + timeout_s
            while open_rids:
                if queue.empty():
                    async with asyncio.timeout_at(deadline):
                        msg = await queue.get()
                else:
                    msg = queue.get_nowait()
                if isinstance(msg, Exception):
                    raise msg
                if isinstance(msg, p.Failure):
                    open_rids.discard(msg.rid)
                    raise RequestFailed(msg)
                if msg.finished:
                    open_rids.discard(msg.rid)
                yield index_of[msg.rid], msg
        except TimeoutError:
            raise DeadlineExceeded(f"stream not finished within {timeout_s:g} s") from None
        finally:
            self._abort(conn, [rid for rid in rids if rid in open_rids])


def handshake(socket_path: Path, role: str, timeout_s: float = HANDSHAKE_TIMEOUT_S) -> p.Welcome | None:
    """The engine's Welcome, or None when no engine answers within timeout_s: the blocking
    wrapper for the Python API (`Phi3MiniService.get_model_info()`), outside any event loop."""

    async def once() -> p.Welcome | None:
        client = EngineClient(socket_path, role, handshake_timeout_s=timeout_s)
        try:
            return await client.connect()
        except EngineUnavailable:
            return None
        finally:
            await client.close()

    return asyncio.run(once())
