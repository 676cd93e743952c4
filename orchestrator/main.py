"""Entry of the efficiency orchestrator process (`citadel-llm orchestrator`).

For now it only waits for its stop signal; sampling the host and steering the
engine's batching limits come with the orchestrator's own issue.
"""

from __future__ import annotations

import asyncio
import signal

from shared import sd_notify
from shared.config import Phi3MiniConfig
from shared.logging import get_logger

log = get_logger(__name__)


def run_orchestrator(config: Phi3MiniConfig) -> int:
    return asyncio.run(_main(config))


async def _main(config: Phi3MiniConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("orchestrator idle (observing only)", efficiency_mode=config.efficiency_mode)
    sd_notify.notify("READY=1")
    await stop.wait()
    log.info("orchestrator stopped")
    return 0
