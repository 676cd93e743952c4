"""A scripted engine worker on a real Unix socket, and the real gateway app in front of it on a
port of 127.0.0.1, in a thread of the test process: for tests of the gateway's own logic
(validation, error bodies, the response schema) at thousands of requests, where the real
engine's speed would only cost time. It answers what the real worker answers, in its shapes;
it validates nothing the gateway has not already checked."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from shared import protocol as p
from shared.framing import FrameConnection

VOCAB = 32064  # Phi-3-mini's, as the demo model's
SCRIPTED_TOKENS = 2  # generated per choice at most: enough for a delta and a final message


class _Worker(FrameConnection[p.GatewayMessage]):
    def __init__(self) -> None:
        super().__init__(p.GatewayMessage)

    def on_message(self, msg: p.GatewayMessage) -> None:
        match msg:
            case p.Hello():
                self.send(p.Welcome(p.PROTOCOL_VERSION, "microsoft/Phi-3-mini-4k-instruct", "/scripted",
                                    ["phi-3-mini", "microsoft/Phi-3-mini-4k-instruct"], 2048, "float32", True,
                                    0.1, engine_pid=os.getpid(), parameter_count=1))
            case p.Generate(rid=rid, params=params, stream=stream):
                self._generate(rid, params, stream)
            case p.GetStats(rid=rid):
                self.send(p.EngineStats(rid, 0, 0, 0.0, 16, 512, 0, 0, 0, 0, max_num_seqs_ceiling=16,
                                        max_num_batched_tokens_ceiling=512))
            case p.Tokenize(rid=rid, text=text):
                ids = [min(ord(c), VOCAB - 1) for c in text or "chat"]
                self.send(p.TokenizeResult(rid, ids, text or ""))
            case p.Detokenize(rid=rid, tokens=tokens):
                self.send(p.TokenizeResult(rid, tokens, "t" * len(tokens)))
            case p.SetLimits(rid=rid, max_num_seqs=seqs, max_num_batched_tokens=tokens):
                self.send(p.LimitsSet(rid, seqs, tokens, 16, 512))
            case p.Abort():
                pass

    def _generate(self, rid: int, params: p.SamplingSpec, stream: bool) -> None:
        tokens = max(1, min(params.max_tokens or SCRIPTED_TOKENS, SCRIPTED_TOKENS))

        def choice(index: int, count: int, finish: p.FinishReason | None) -> p.Choice:
            logprobs = None
            if params.logprobs is not None:
                top = [p.TopLogprob(f"t{k}", -1.0 - k) for k in range(params.logprobs)]
                logprobs = [p.TokenLogprob("x", -1.0, top) for _ in range(count)]
            return p.Choice(index, "x" * count, count, finish, logprobs)

        if stream:
            self.send(p.Output(rid, [choice(i, 1, None) for i in range(params.n)], prompt_tokens=1))
            last = [choice(i, tokens - 1, p.FinishReason.LENGTH) for i in range(params.n)]
        else:
            last = [choice(i, tokens, p.FinishReason.LENGTH) for i in range(params.n)]
        self.send(p.Output(rid, last, finished=True, prompt_tokens=1, ttft_s=0.001, decode_s=0.001))



@contextmanager
def scripted_gateway(runtime_dir: Path, port: int) -> Iterator[None]:
    """The real gateway app (`create_app`) on 127.0.0.1:port, over a scripted worker on the
    config's engine socket; both in one event loop on a thread, stopped on the way out."""
    from service.gateway.app import create_app
    from service.gateway.keys import CLIENT
    from shared.config import Phi3MiniConfig

    config = Phi3MiniConfig(runtime_dir=str(runtime_dir), host="127.0.0.1", port=port)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failed: list[BaseException] = []

    async def main() -> None:
        socket_path = config.engine_socket_path()
        socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        server = await loop.create_unix_server(_Worker, str(socket_path))
        app = create_app(config)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
            async with asyncio.timeout(30):
                while not app[CLIENT].ready:
                    await asyncio.sleep(0.02)
            ready.set()
            await stop.wait()
        finally:
            await runner.cleanup()
            server.close()
            await server.wait_closed()

    def run() -> None:
        try:
            loop.run_until_complete(main())
        except BaseException as exc:  # noqa: BLE001 - reported to the test below
            failed.append(exc)
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="scripted-gateway", daemon=True)
    thread.start()
    try:
        assert ready.wait(60), "the scripted gateway did not start within 60 s"
        assert not failed, failed
        yield
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        assert not thread.is_alive(), "the scripted gateway did not stop within 30 s"
