"""The gateway process: an aiohttp app factory and the process entry (`citadel-llm gateway`)."""

from __future__ import annotations

import asyncio
import gc
import uuid
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import web

from shared.engine_client import EngineClient, EngineUnavailable
from service.gateway.health import HealthMonitor
from service.gateway.keys import CLIENT, CONFIG, DRAINING, HEALTH, LOOP_LAG, METRICS, STARTED
from service.gateway.metrics import Metrics
from service.gateway.errors import ApiError, error_response
from service.gateway.middlewares import check_api_key, request_middleware
from service.gateway.routes import add_routes
from service.gateway.runner import GatewayRunner
from shared import sd_notify
from shared.config import Phi3MiniConfig
from shared.logging import get_logger
from shared.loop_lag import LoopLag

log = get_logger(__name__)

# The last part of the stop (config.stop_timeout_s): handlers still running when the drain's
# time is up get this long to write the 503 they were just given, then they are cancelled.
CLEANUP_S = 1.0
KEEPALIVE_TIMEOUT_S = 75.0


def create_app(config: Phi3MiniConfig) -> web.Application:
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[request_middleware])
    app[CONFIG] = config
    app[CLIENT] = EngineClient(config.engine_socket_path())
    app[HEALTH] = HealthMonitor(app[CLIENT], config.health_check_interval)
    app[LOOP_LAG] = LoopLag()
    app[METRICS] = Metrics(app[LOOP_LAG])
    app[STARTED] = time.time()
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.append(_loop_lag)
    app.cleanup_ctx.append(_engine_client)
    add_routes(app)
    return app


def create_metrics_app(main: web.Application) -> web.Application:
    """The monitoring port's app: GET /metrics over the main app's state."""
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        try:
            check_api_key(main[CONFIG].api_key, request)  # the API port's check, and its error
        except ApiError as err:
            return error_response(err, uuid.uuid4().hex)
        return await main[METRICS].handle(request, main[CLIENT])

    app.router.add_get("/metrics", metrics)
    return app


async def metrics_server(app: web.Application) -> AsyncIterator[None]:
    """The monitoring port, a resource of the main app: up before it serves, and still up
    through the drain (operators watch a stop on it), closed after the last handler."""
    config = app[CONFIG]
    runner = web.AppRunner(create_metrics_app(app), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.metrics_host, config.metrics_port, reuse_address=True).start()
        yield
    finally:
        await runner.cleanup()


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    app[LOOP_LAG].start()
    yield
    await app[LOOP_LAG].close()


async def _engine_client(app: web.Application) -> AsyncIterator[None]:
    client = app[CLIENT]
    await client.start()
    await app[HEALTH].start()
    yield
    await app[HEALTH].close()
    await client.close()


async def _notify_when_ready(client: EngineClient) -> None:
    """systemd READY=1 only once the gateway serves and the engine has answered; then
    WATCHDOG=1 while the event loop turns, so that a gateway stuck in it is restarted."""
    while not client.ready:
        await asyncio.sleep(0.2)
    sd_notify.notify("READY=1\nSTATUS=serving")
    interval = sd_notify.watchdog_interval_s()
    while interval is not None:
        await asyncio.sleep(interval)
        sd_notify.notify("WATCHDOG=1")


def run_gateway(config: Phi3MiniConfig) -> int:
    import uvloop

    return uvloop.run(_serve(config))


async def _serve(config: Phi3MiniConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    app.cleanup_ctx.append(metrics_server)  # not in create_app: its tests bind no port
    gc.collect()
    gc.freeze()  # start-up objects live as long as the process: keep them out of collections
    runner = GatewayRunner(app, head_timeout_s=config.client_timeout_s, handler_cancellation=True, access_log=None,
                           keepalive_timeout=KEEPALIVE_TIMEOUT_S, shutdown_timeout=CLEANUP_S)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=1024, reuse_address=True)
    await site.start()
    log.info("gateway listening", host=config.host, port=config.port, metrics_port=config.metrics_port,
             engine_socket=str(config.engine_socket_path()))
    ready = loop.create_task(_notify_when_ready(app[CLIENT]), name="systemd-notify")
    try:
        await stop.wait()
        sd_notify.notify("STOPPING=1")
        log.info("gateway draining", stop_timeout_s=config.stop_timeout_s, in_flight=app[METRICS].handling)
        app[DRAINING].set()  # new requests get 503 and /health says draining, while…
        deadline = loop.time() + max(config.stop_timeout_s - CLEANUP_S, 0.0)
        # …those in flight finish (in the engine, and on their way out to the client): the
        # listener stays open, answering 503, as long as anything is in flight
        while (app[CLIENT].pending or app[METRICS].handling) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if app[CLIENT].pending:  # out of time: each gets its answer (503, or a stream's error event)
            log.warning("stop deadline passed: ending requests in flight", requests=app[CLIENT].pending)
            app[CLIENT].fail_in_flight(EngineUnavailable("The service is stopping; retry on another replica"))
    finally:
        ready.cancel()
        await asyncio.gather(ready, return_exceptions=True)
        await runner.cleanup()  # stops accepting, waits for handlers (bounded), then the cleanup_ctx
    log.info("gateway stopped")
    return 0
