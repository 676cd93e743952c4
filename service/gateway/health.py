"""Is the engine making progress? A probe every health_check_interval seconds: the worker must
answer, and either make engine steps for the requests it holds or, when idle, generate one
token for the probe itself. Two failed probes in a row mark the engine stalled: /health says
so, waiting requests get 503, and new ones are refused until a probe succeeds again."""

from __future__ import annotations

import asyncio
import contextlib

from shared.engine_client import DeadlineExceeded, EngineClient, EngineUnavailable, RequestFailed
from shared import protocol as p
from shared.logging import get_logger

log = get_logger(__name__)

PROBE_PROMPT = [1, 2, 3]  # token ids: no tokenizing, valid in any vocabulary of this model family
PROBE_PARAMS = p.SamplingSpec(max_tokens=1, ignore_eos=True)



class HealthMonitor:
    def __init__(self, client: EngineClient, interval_s: float) -> None:
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = min(max(interval_s / 2, 0.5), 5.0)
        self.stalled = False  # the engine answered before but stopped making progress
        self._task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        return self.client.ready and not self.stalled

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-health")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def probe(self) -> str | None:
        """None when the engine makes progress, else why not."""
        try:
            stats = await self.client.stats(self.timeout_s)
            if stats.in_flight == 0:
                await self.client.complete([PROBE_PROMPT], PROBE_PARAMS, "health-probe", self.timeout_s, probe=True)
            elif stats.seconds_since_output > 2 * self.interval_s:
                return f"no output for {stats.seconds_since_output:.1f} s with {stats.in_flight} requests in flight"
        except EngineUnavailable:
            return None  # not connected: reported as loading/unavailable already
        except (TimeoutError, DeadlineExceeded):
            return f"no answer within {self.timeout_s:g} s"
        except RequestFailed as exc:  # the probe is never refused (protocol.Generate.probe)
            return f"probe failed: {exc}"
        return None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self.client.ready:
                self.stalled = False
                continue
            problem = await self.probe()
            if problem is not None:
                # One slow probe can be a busy host; a second one right after is a stalled
                # engine. Both fit in one interval, so a stall shows within two intervals.
                log.warning("engine probe failed; probing again", reason=problem)
                problem = await self.probe()
            if problem is None:
                if self.stalled:
                    log.info("engine making progress again")
                self.stalled = False
            elif not self.stalled:
                log.error("engine stalled", reason=problem)
                self.stalled = True
                self.client.fail_in_flight(EngineUnavailable(f"engine stalled: {problem}"))
