"""The wire protocol: every message round-trips; framing survives splits and rejects bad frames."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from shared import protocol as p
from shared.framing import MAX_FRAME_BYTES, FrameConnection, FrameEncoder

GATEWAY_MESSAGES: list[p.GatewayMessage] = [
    p.Hello(p.PROTOCOL_VERSION, "gateway"),
    p.Generate(7, "hello", p.SamplingSpec(max_tokens=5, n=2, stop=["x"], seed=3), stream=True, request_id="r"),
    p.Generate(8, [1, 2, 3], p.SamplingSpec(), chat=[p.ChatMessage("user", "hi")], echo=True, probe=True),
    p.Generate(13, "", p.SamplingSpec(response_format=p.StructuredOutput('{"type": "boolean"}')),
               chat=[p.ChatMessage("user", "json")]),
    p.Generate(14, "", p.SamplingSpec(logit_bias=[(1, 2.0)], response_format=p.StructuredOutput(None))),
    p.Abort(7),
    p.GetStats(9, 2.5),
    p.Tokenize(10, None, [p.ChatMessage("system", "s"), p.ChatMessage("user", "u")], False, False),
    p.Detokenize(11, [1, 2]),
    p.SetLimits(12, 8, 256, "test"),
]
WORKER_MESSAGES: list[p.WorkerMessage] = [
    p.Welcome(p.PROTOCOL_VERSION, "m", "/x", ["a", "b"], 2048, "float32", True, 1.5, 42),
    p.HandshakeRefused("no"),
    p.Output(7, [p.Choice(0, "hi", 1), p.Choice(1, "", 0, p.FinishReason.LENGTH)], True, 5),
    p.Output(8, []),
    p.Output(9, [p.Choice(0, "ab", 2, p.FinishReason.STOP, [p.TokenLogprob("a", None, []),
                                                            p.TokenLogprob("b", -0.5, [p.TopLogprob("b", -0.5)])])],
             True, 3, 0.01, 0.02),
    p.Failure(7, 400, "bad", "max_tokens", "c"),
    p.Failure(8, 429, "busy", None, "overloaded", 1.5),
    p.EngineStats(1, 2, 3, 0.5, 16, 512, 4, 10, 20, 5, [99], 0.1, queued=2, refused_total={"queue_full": 1},
                  window_requests=3, e2e_p95_s=0.2),
    p.LimitsSet(2, 8, 256, 16, 512),
    p.TokenizeResult(3, [1, 2], "x"),
]


def test_every_message_type_is_covered() -> None:
    """A message type added to the protocol without a case here fails this test."""
    import typing

    assert {type(m) for m in GATEWAY_MESSAGES} == set(typing.get_args(p.GatewayMessage))
    assert {type(m) for m in WORKER_MESSAGES} == set(typing.get_args(p.WorkerMessage))


@pytest.mark.parametrize("msg", GATEWAY_MESSAGES, ids=lambda m: type(m).__name__)
def test_gateway_messages_round_trip(msg: p.GatewayMessage) -> None:
    data = msgspec.msgpack.encode(msg)
    assert msgspec.msgpack.decode(data, type=p.GatewayMessage) == msg


@pytest.mark.parametrize("msg", WORKER_MESSAGES, ids=lambda m: type(m).__name__)
def test_worker_messages_round_trip(msg: p.WorkerMessage) -> None:
    data = msgspec.msgpack.encode(msg)
    assert msgspec.msgpack.decode(data, type=p.WorkerMessage) == msg


def test_sampling_spec_without_the_appended_field_decodes() -> None:
    """Schema evolution by appended fields: a SamplingSpec encoded before response_format
    existed (one element shorter) decodes with the default."""
    full = msgspec.msgpack.decode(msgspec.msgpack.encode(p.SamplingSpec(max_tokens=3, logit_bias=[(1, 2.0)])))
    older = msgspec.msgpack.encode(full[: len(p.SamplingSpec.__struct_fields__) - 1])
    assert msgspec.msgpack.decode(older, type=p.SamplingSpec) == p.SamplingSpec(max_tokens=3, logit_bias=[(1, 2.0)])


def test_directions_do_not_mix() -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(p.Abort(1)), type=p.WorkerMessage)


def test_finish_reason_names() -> None:
    assert [r.openai for r in p.FinishReason] == ["stop", "length", "abort"]


class _Recorder(FrameConnection[p.GatewayMessage]):
    def __init__(self) -> None:
        super().__init__(p.GatewayMessage)
        self.got: list[p.GatewayMessage] = []
        self.bad: list[Exception] = []

    def on_message(self, msg: p.GatewayMessage) -> None:
        self.got.append(msg)

    def on_bad_frame(self, exc: Exception) -> None:  # type: ignore[override]
        self.bad.append(exc)


def test_frames_split_anywhere_are_reassembled() -> None:
    enc = FrameEncoder()
    stream = b"".join(enc.encode(m) for m in GATEWAY_MESSAGES)
    for step in (1, 3, 7, len(stream)):
        rec = _Recorder()
        for i in range(0, len(stream), step):
            rec.data_received(stream[i : i + step])
        assert rec.got == GATEWAY_MESSAGES
        assert not rec.bad


def test_oversized_frame_is_refused_before_reading_it() -> None:
    rec = _Recorder()
    rec.data_received((MAX_FRAME_BYTES + 1).to_bytes(4, "big") + b"x")
    assert rec.bad and "exceeds" in str(rec.bad[0])


def test_garbage_frame_is_an_error_for_the_connection() -> None:
    rec = _Recorder()
    rec.data_received((3).to_bytes(4, "big") + b"\xc1\xc1\xc1")
    assert rec.bad and not rec.got


def test_wrong_shape_frame_is_an_error() -> None:
    rec = _Recorder()
    rec.data_received(FrameEncoder().encode({"t": "gen", "rid": "x"}))
    assert rec.bad


async def test_frames_over_a_real_unix_socket(tmp_path) -> None:
    got: asyncio.Queue[p.GatewayMessage] = asyncio.Queue()

    class Server(_Recorder):
        def on_message(self, msg: p.GatewayMessage) -> None:
            got.put_nowait(msg)

    path = str(tmp_path / "s.sock")
    server = await asyncio.get_running_loop().create_unix_server(Server, path)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        enc = FrameEncoder()
        writer.write(b"".join(enc.encode(m) for m in GATEWAY_MESSAGES))
        await writer.drain()
        received = [await asyncio.wait_for(got.get(), 5) for _ in GATEWAY_MESSAGES]
        assert received == GATEWAY_MESSAGES
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_a_message_over_the_frame_cap_is_refused_at_the_sender() -> None:
    from shared.framing import MAX_FRAME_BYTES, FrameEncoder, FrameTooLarge

    encoder = FrameEncoder()
    with pytest.raises(FrameTooLarge, match="16 MiB frame cap"):
        encoder.encode(b"x" * (MAX_FRAME_BYTES + 1))
    assert len(encoder.encode(b"ok")) < 64  # the encoder is still usable, its buffer small again
