"""Length-prefixed msgpack frames over a stream socket: a 4-byte big-endian size, then the body.

`FrameConnection` is an asyncio Protocol shared by both ends of the socket: it
splits the byte stream into frames, decodes each with one typed decoder, and
hands the message to a callback synchronously (no task per frame on the hot path).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any, Generic, TypeVar

import msgspec

MAX_FRAME_BYTES = 16 << 20  # a 2K-token prompt is ~10 KiB; anything near this is a bug or an attack
_HEADER = struct.Struct(">I")
HIGH_WATER_BYTES = 4 << 20

M = TypeVar("M")


class FrameError(Exception):
    """The peer sent something that is not a valid frame: the connection is dropped."""


class PeerNotReading(Exception):
    """The peer did not read what was sent to it within the time allowed."""


class FrameTooLarge(ValueError):
    """A message to send would not fit one frame; nothing was sent."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a message of {size / 2**20:.1f} MiB exceeds the {MAX_FRAME_BYTES >> 20} MiB frame cap")
        self.size = size


class FrameEncoder:
    """Encodes messages into one reused buffer, each with its length prefix."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._buf = bytearray(64)

    def encode(self, msg: Any) -> bytes:
        buf = self._buf
        self._encoder.encode_into(msg, buf, _HEADER.size)
        size = len(buf) - _HEADER.size
        if size > MAX_FRAME_BYTES:  # the peer would drop the whole connection for it
            del buf[64:]  # do not keep the large buffer around
            raise FrameTooLarge(size)
        _HEADER.pack_into(buf, 0, size)
        return bytes(buf)


class FrameConnection(asyncio.Protocol, Generic[M]):
    """One end of a framed connection; subclasses implement `on_message` and `on_lost`."""

    def __init__(self, decode_type: Any) -> None:
        self._decoder: msgspec.msgpack.Decoder[M] = msgspec.msgpack.Decoder(decode_type)
        self._frames = FrameEncoder()
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        # Frames queued in one event-loop turn go out in one write: under load many
        # requests finish in the same engine step, and this saves a syscall each.
        self._outbox: list[bytes] = []
        self._flush_scheduled = False

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.set_write_buffer_limits(high=HIGH_WATER_BYTES)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        offset = 0
        try:
            while len(buf) - offset >= 4:
                (size,) = _HEADER.unpack_from(buf, offset)
                if size > MAX_FRAME_BYTES:
                    raise FrameError(f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
                end = offset + 4 + size
                if len(buf) < end:
                    break
                try:
                    msg = self._decoder.decode(memoryview(buf)[offset + 4 : end])
                except msgspec.DecodeError as exc:
                    raise FrameError(f"undecodable frame: {exc}") from exc
                offset = end
                self.on_message(msg)
        except FrameError as exc:
            self.on_bad_frame(exc)
            return
        finally:
            if offset:
                del buf[:offset]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._writable.set()
        self.on_lost(exc)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- sending
    def send(self, msg: Any) -> bool:
        """Queue one message; False when the connection is gone. FrameTooLarge (nothing
        sent) when it would not fit one frame."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        self._outbox.append(self._frames.encode(msg))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def _flush(self) -> None:
        self._flush_scheduled = False
        frames, self._outbox = self._outbox, []
        transport = self.transport
        if frames and transport is not None and not transport.is_closing():
            transport.write(b"".join(frames) if len(frames) > 1 else frames[0])

    async def wait_writable(self, timeout_s: float) -> None:
        """Backpressure: wait (bounded) until the kernel drains the write buffer;
        PeerNotReading after timeout_s."""
        if not self._writable.is_set():
            try:
                await asyncio.wait_for(self._writable.wait(), timeout_s)
            except TimeoutError:
                raise PeerNotReading(f"the peer read nothing for {timeout_s:g} s") from None

    def close(self) -> None:
        """Close after sending what is queued."""
        self._flush()
        if self.transport is not None:
            self.transport.close()

    # -- for subclasses
    def on_message(self, msg: M) -> None:
        raise NotImplementedError

    def on_lost(self, exc: Exception | None) -> None:
        pass

    def on_bad_frame(self, exc: FrameError) -> None:
        """A malformed frame ends this connection, never the process."""
        if self.transport is not None:
            self.transport.abort()

