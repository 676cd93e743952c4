"""Is the engine making progress? A probe every health_check_interval seconds: the worker must
answer, and either make engine steps for the requests it holds or, when idle, generate one
token for the probe itself. Two failed probes in a row mark the engine stalled: /health says
so, waiting requests get 503, and new ones are refused until a probe succeeds again.

Stalled means no progress, measured: a probe answered late is a stall only if, while it
waited, no output reached any request and neither the EngineCore nor the engine worker used
CPU; no output for a while with requests in flight is one only if the EngineCore is not
computing. One step of a long prefill on a larger model or a busy 2-core host can take tens
of seconds (a burst of 1,000-token prompts on a 30-layer model did), a probe sent as a burst
arrives waits behind its prompts (a burst of 50 on the same model took 6 s), a worker whose
loop is busy with one large answer (16 sequences of 20 log-probabilities) answers late, and
a host whose cores are taken by others slows all of it: failing every request for any of
those would be wrong. A stopped, deadlocked or starved engine uses no CPU and produces
nothing: that is a stall."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from shared.engine_client import DeadlineExceeded, EngineClient, EngineUnavailable, RequestFailed
from shared import protocol as p
from shared.logging import get_logger
from shared.process_tree import cpu_seconds

log = get_logger(__name__)

PROBE_PROMPT = [1, 2, 3]  # token ids: no tokenizing, valid in any vocabulary of this model family
PROBE_PARAMS = p.SamplingSpec(max_tokens=1, ignore_eos=True)
# Below this share of one core since the last probe, an engine without output is stalled.
BUSY_CORES = 0.05



class HealthMonitor:
    def __init__(self, client: EngineClient, interval_s: float,
                 core_cpu_s: Callable[[list[int]], float] = cpu_seconds) -> None:
        self.client = client
        self.interval_s = interval_s
        self.timeout_s = min(max(interval_s / 2, 0.5), 5.0)
        self.stalled = False  # the engine answered before but stopped making progress
        self._task: asyncio.Task[None] | None = None
        self._cpu_seen: tuple[float, float] | None = None  # (loop time, EngineCore CPU seconds) at a probe
        self._busy = True  # the EngineCore's CPU use over the last probe interval was above BUSY_CORES
        self._core_cpu_s = core_cpu_s
        self._core_pids: list[int] = []  # the EngineCore's, from the last stats the worker answered

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
        # the EngineCore's and the worker's, measured before and after with the same pids (an
        # engine restart changes them)
        pids = self._engine_pids()
        outputs_before = self.client.outputs_received
        sent, cpu_before = asyncio.get_running_loop().time(), self._core_cpu_s(pids)
        try:
            stats = await self.client.stats(self.timeout_s)
            self._core_pids = stats.engine_core_pids
            computing = self._computing(stats.engine_cpu_s)
            if stats.in_flight == 0:
                await self.client.complete([PROBE_PROMPT], PROBE_PARAMS, "health-probe", self.timeout_s, probe=True)
            elif stats.seconds_since_output > 2 * self.interval_s and not computing:
                return (f"no output for {stats.seconds_since_output:.1f} s with {stats.in_flight} requests in "
                        "flight, and the EngineCore not computing")
        except EngineUnavailable:
            return None  # not connected: reported as loading/unavailable already
        except (TimeoutError, DeadlineExceeded):
            # A probe sent as a burst arrives waits behind its prompts, a worker busy with a
            # large answer or feeding a full batch on a busy host answers late: none of them is
            # a stall while output arrives or the engine's processes compute.
            waited = asyncio.get_running_loop().time() - sent
            outputs = self.client.outputs_received - outputs_before
            cores = (self._core_cpu_s(pids) - cpu_before) / max(waited, 1e-3)
            if outputs > 0 or cores >= BUSY_CORES:
                log.info("engine busy: probe answered late while the engine makes progress",
                         waited_s=round(waited, 1), outputs=outputs, cores=round(cores, 2))
                return None
            return f"no answer within {self.timeout_s:g} s, no output and no CPU used meanwhile"
        except RequestFailed as exc:  # the probe is never refused (protocol.Generate.probe)
            return f"probe failed: {exc}"
        return None

    def _engine_pids(self) -> list[int]:
        """The EngineCore's pids (from the last stats) and the engine worker's (from its welcome)."""
        info = self.client.info
        worker = [info.engine_pid] if info is not None and info.engine_pid not in self._core_pids else []
        return [*self._core_pids, *worker]

    def _computing(self, cpu_s: float) -> bool:
        """Whether the EngineCore used CPU over the last probe interval. A probe that follows
        another at once (the second of a failed pair) reuses that interval's verdict; the first
        probe has no evidence and does not call a stall on it."""
        now = asyncio.get_running_loop().time()
        if self._cpu_seen is None:
            self._cpu_seen = (now, cpu_s)
            return True
        since, used = self._cpu_seen
        if now - since >= self.interval_s / 2:
            self._busy = (cpu_s - used) / (now - since) >= BUSY_CORES
            self._cpu_seen = (now, cpu_s)
        return self._busy

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
