"""The engine client's connection handling, against a scripted peer on a real Unix socket:
a handshake that never completes closes its connection, and a lost connection fails its
own waiters at once, then the client reconnects and serves on the new one."""

from __future__ import annotations

import asyncio
import os
import struct
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from shared import protocol as p
from shared.engine_client import EngineClient, EngineUnavailable, handshake
from shared.framing import FrameEncoder


def welcome(pid: int) -> p.Welcome:
    return p.Welcome(p.PROTOCOL_VERSION, "m", "/m", ["m"], 2048, "float32", True, 1.0, engine_pid=pid)


class Peer:
    """A worker socket that greets (or not) and answers Tokenize (or holds it)."""

    def __init__(self, path: Path) -> None:
        self.path, self.greet, self.answer = path, True, True
        self.connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.closed_by_client = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.append((reader, writer))
        frames, decoder = FrameEncoder(), msgspec.msgpack.Decoder(p.GatewayMessage)
        pid = len(self.connections)
        try:
            while True:
                (size,) = struct.unpack(">I", await reader.readexactly(4))
                msg = decoder.decode(await reader.readexactly(size))
                if isinstance(msg, p.Hello) and self.greet:
                    writer.write(frames.encode(welcome(pid)))
                elif isinstance(msg, p.Tokenize) and self.answer:
                    writer.write(frames.encode(p.TokenizeResult(msg.rid, [pid], "")))
        except asyncio.IncompleteReadError:
            self.closed_by_client.set()
        except ConnectionError:
            pass

    def drop_all(self) -> None:
        for _, writer in self.connections:
            writer.transport.abort()


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    with tempfile.TemporaryDirectory() as tmp:
        peer = Peer(Path(tmp) / "engine.sock")
        await peer.start()
        yield peer
        assert peer.server is not None
        peer.drop_all()
        peer.server.close()


async def test_a_handshake_that_never_completes_closes_its_connection(peer: Peer) -> None:
    peer.greet = False
    client = EngineClient(peer.path, role="test", handshake_timeout_s=0.3)
    with pytest.raises(EngineUnavailable, match="no handshake within 0.3 s"):
        await client.connect()
    await asyncio.wait_for(peer.closed_by_client.wait(), 2)  # not left open on the worker
    assert not client.ready and client.pending == 0


async def test_a_lost_connection_fails_its_waiters_at_once_then_the_client_serves_again(peer: Peer) -> None:
    client = EngineClient(peer.path, role="test")
    await client.start()
    try:
        for _ in range(100):
            if client.ready:
                break
            await asyncio.sleep(0.02)
        assert client.info is not None and client.info.engine_pid == 1
        peer.answer = False
        waiters = [asyncio.ensure_future(client.tokenize("x", None, True, timeout_s=30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        assert client.pending == 3
        loop = asyncio.get_running_loop()
        dropped = loop.time()
        peer.drop_all()
        for waiter in waiters:
            with pytest.raises(EngineUnavailable, match="went away"):
                await asyncio.wait_for(waiter, 2)
        assert loop.time() - dropped < 1  # at once, not at the 30 s timeout
        assert client.pending == 0

        peer.answer = True
        for _ in range(200):  # reconnects with backoff
            if client.ready:
                break
            await asyncio.sleep(0.02)
        assert client.info is not None and client.info.engine_pid == 2 and client.engine_restarts == 1
        assert (await client.tokenize("x", None, True, timeout_s=2)).tokens == [2]
    finally:
        await client.close()


def test_the_blocking_handshake_returns_the_welcome_or_none() -> None:
    """The Python API's wrapper, outside any event loop (as `get_model_info()` runs)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "engine.sock"
        assert handshake(path, "test", timeout_s=0.5) is None  # nothing listens

        ready = os.pipe()

        async def serve_once() -> None:
            peer = Peer(path)
            await peer.start()
            os.write(ready[1], b"x")
            await asyncio.sleep(3)
            peer.drop_all()

        import threading

        thread = threading.Thread(target=asyncio.run, args=(serve_once(),), daemon=True)
        thread.start()
        os.read(ready[0], 1)
        info = handshake(path, "test", timeout_s=2)
        assert info is not None and info.engine_pid == 1
