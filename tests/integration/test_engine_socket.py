"""The engine worker's Unix socket, spoken to directly: handshake, permissions, multiplexing,
aborts, and bad frames that must not hurt the worker."""

from __future__ import annotations

import asyncio
import os
import stat

import msgspec
import pytest

from shared import protocol as p
from shared.framing import FrameEncoder
from tests.helpers import ServiceProcess

pytestmark = pytest.mark.integration


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.enc = FrameEncoder()
        self.dec = msgspec.msgpack.Decoder(p.WorkerMessage)

    def send(self, msg: object) -> None:
        self.writer.write(self.enc.encode(msg))

    async def recv(self, timeout_s: float = 30.0) -> p.WorkerMessage:
        size = int.from_bytes(await asyncio.wait_for(self.reader.readexactly(4), timeout_s), "big")
        return self.dec.decode(await asyncio.wait_for(self.reader.readexactly(size), timeout_s))

    def close(self) -> None:
        self.writer.close()


async def connect(service: ServiceProcess, greet: bool = True) -> Peer:
    reader, writer = await asyncio.open_unix_connection(str(service.runtime_dir / "engine.sock"))
    peer = Peer(reader, writer)
    if greet:
        peer.send(p.Hello(p.PROTOCOL_VERSION, "test"))
        welcome = await peer.recv()
        assert isinstance(welcome, p.Welcome)
    return peer


def test_socket_file_is_private(service: ServiceProcess) -> None:
    mode = stat.S_IMODE(os.stat(service.runtime_dir / "engine.sock").st_mode)
    assert mode & 0o077 == 0, oct(mode)


async def test_handshake_reports_the_model(service: ServiceProcess) -> None:
    reader, writer = await asyncio.open_unix_connection(str(service.runtime_dir / "engine.sock"))
    peer = Peer(reader, writer)
    peer.send(p.Hello(p.PROTOCOL_VERSION, "test"))
    welcome = await peer.recv()
    peer.close()
    assert isinstance(welcome, p.Welcome)
    assert welcome.protocol_version == p.PROTOCOL_VERSION
    assert welcome.max_model_len == 2048
    assert welcome.demo_model is True
    assert welcome.dtype == "float32"
    assert "phi-3-mini" in welcome.served_names


async def test_wrong_protocol_version_is_refused(service: ServiceProcess) -> None:
    peer = await connect(service, greet=False)
    peer.send(p.Hello(p.PROTOCOL_VERSION + 99, "test"))
    refused = await peer.recv()
    assert isinstance(refused, p.HandshakeRefused)
    assert str(p.PROTOCOL_VERSION) in refused.message
    peer.close()


async def test_requests_before_handshake_close_the_connection(service: ServiceProcess) -> None:
    peer = await connect(service, greet=False)
    peer.send(p.Generate(1, "hi", p.SamplingSpec(max_tokens=2)))
    with pytest.raises(asyncio.IncompleteReadError):
        await peer.recv(10)


async def test_multiplexed_requests_and_streams(service: ServiceProcess) -> None:
    peer = await connect(service)
    spec = p.SamplingSpec(max_tokens=4, ignore_eos=True)
    for rid in range(1, 6):
        peer.send(p.Generate(rid, "hello there", spec, stream=rid % 2 == 0))
    finished: dict[int, int] = {}
    tokens: dict[int, int] = {}
    while len(finished) < 5:
        msg = await peer.recv()
        assert isinstance(msg, p.Output), msg
        tokens[msg.rid] = tokens.get(msg.rid, 0) + sum(c.tokens for c in msg.choices)
        if msg.finished:
            finished[msg.rid] = msg.prompt_tokens
    assert tokens == {rid: 4 for rid in range(1, 6)}
    assert all(n > 0 for n in finished.values())
    peer.close()


async def test_bad_request_fails_alone(service: ServiceProcess) -> None:
    peer = await connect(service)
    peer.send(p.Generate(1, [5] * 3000, p.SamplingSpec(max_tokens=2)))
    peer.send(p.Generate(2, "fine", p.SamplingSpec(max_tokens=2)))
    got = {}
    while len(got) < 2:
        msg = await peer.recv()
        if isinstance(msg, p.Failure) or msg.finished:
            got[msg.rid] = msg
    assert isinstance(got[1], p.Failure) and got[1].status == 400 and got[1].param == "prompt"
    assert isinstance(got[2], p.Output)
    peer.close()


async def test_abort_stops_a_long_generation(service: ServiceProcess) -> None:
    peer = await connect(service)
    peer.send(p.Generate(1, "a long one", p.SamplingSpec(max_tokens=1500, ignore_eos=True), stream=True))
    first = await peer.recv()
    assert isinstance(first, p.Output) and not first.finished
    peer.send(p.Abort(1))
    # after the abort the worker still answers, and rid 1 never runs to its 1,500 tokens: what
    # still comes of it are the deltas already on their way (how many depends on the pace)
    peer.send(p.Generate(2, "next", p.SamplingSpec(max_tokens=2)))
    tokens_of_1 = sum(c.tokens for c in first.choices)
    while True:
        msg = await peer.recv(60)
        if msg.rid == 1:
            if isinstance(msg, p.Output):
                tokens_of_1 += sum(c.tokens for c in msg.choices)
                assert not any(c.finish_reason == p.FinishReason.LENGTH for c in msg.choices), msg
            continue
        if isinstance(msg, p.Output) and msg.finished:
            break
    assert tokens_of_1 < 1500
    peer.close()


async def test_garbage_frame_drops_only_that_connection(service: ServiceProcess) -> None:
    bad = await connect(service)
    bad.writer.write((5).to_bytes(4, "big") + b"\xc1\xc1\xc1\xc1\xc1")
    with pytest.raises(asyncio.IncompleteReadError):
        await bad.recv(10)
    huge = await connect(service)
    huge.writer.write((1 << 30).to_bytes(4, "big"))
    with pytest.raises(asyncio.IncompleteReadError):
        await huge.recv(10)
    good = await connect(service)
    good.send(p.Generate(1, "still alive", p.SamplingSpec(max_tokens=2)))
    msg = await good.recv()
    while not (isinstance(msg, p.Output) and msg.finished):
        msg = await good.recv()
    good.close()
