"""The gateway's progress probe decides stalled or not: pure logic over a pretend engine client
(the real engine's stalls are in tests/integration/test_processes.py).

Found on the real model with vLLM's server beside it: a probe sent just as a burst of 50
requests arrived queued behind their prompts, answered after more than the 5 s timeout twice,
and the engine was marked stalled: the burst's 100 requests got 503 while the EngineCore was
computing them."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.gateway.health import HealthMonitor
from shared import protocol as p


CORE_PID, WORKER_PID = 4242, 4241


class PretendClient:
    """Answers stats after `stats_s`; the probe's token comes after `probe_s`; the EngineCore's
    CPU clock runs at `cores` and the engine worker's at `worker_cores` (0: stopped) in real
    time; `outputs_per_s` outputs reach requests meanwhile."""

    ready = True

    def __init__(self, probe_s: float, cores: float, stats_s: float = 0.0, worker_cores: float = 0.0,
                 outputs_per_s: float = 0.0) -> None:
        self.probe_s, self.cores, self.stats_s = probe_s, cores, stats_s
        self.worker_cores, self.outputs_per_s = worker_cores, outputs_per_s
        self.started = time.monotonic()
        self.failed: list[Exception] = []
        self.info: p.Welcome | None = None  # set once "connected" (the worker's pid)

    @property
    def outputs_received(self) -> int:
        return int((time.monotonic() - self.started) * self.outputs_per_s)

    def core_cpu_s(self, pids: list[int]) -> float:
        elapsed = time.monotonic() - self.started
        return elapsed * (self.cores * (CORE_PID in pids) + self.worker_cores * (WORKER_PID in pids))

    async def stats(self, timeout_s: float) -> p.EngineStats:
        if self.stats_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise TimeoutError
        return p.EngineStats(rid=0, running=0, waiting=0, kv_cache_usage=0.0, max_num_seqs=32,
                             max_num_batched_tokens=1024, in_flight=0, prompt_tokens_total=0,
                             generation_tokens_total=0, requests_finished_total=0,
                             engine_core_pids=[CORE_PID], engine_cpu_s=self.core_cpu_s([CORE_PID]))

    async def complete(self, prompts, params, request_id, timeout_s, probe=False):  # type: ignore[no-untyped-def]
        if self.probe_s > timeout_s:
            await asyncio.sleep(timeout_s)
            raise TimeoutError
        await asyncio.sleep(self.probe_s)
        return []

    def fail_in_flight(self, exc: Exception) -> None:
        self.failed.append(exc)


STALLED = "no answer within 0.5 s, no output and no CPU used meanwhile"


def _monitor(client: PretendClient) -> HealthMonitor:
    return HealthMonitor(client, interval_s=0.4, core_cpu_s=client.core_cpu_s)  # type: ignore[arg-type]


@pytest.mark.parametrize("late", ["probe_s", "stats_s"])  # the probe's token, or the worker's stats
@pytest.mark.parametrize(("cores", "verdict"), [(1.0, None), (0.0, STALLED)])
async def test_a_late_answer_is_a_stall_only_without_the_engine_core_computing(
        late: str, cores: float, verdict: str | None) -> None:
    client = PretendClient(probe_s=0.01, cores=cores)
    monitor = _monitor(client)
    assert await monitor.probe() is None  # answered in time: learns the EngineCore's pid
    setattr(client, late, 10.0)
    assert await monitor.probe() == verdict


async def test_a_first_late_probe_has_no_evidence_of_computing() -> None:
    """Before the worker has named its EngineCore (or after a restart renamed it), a late
    answer is not excused by CPU the monitor could not measure over the probe."""
    assert await _monitor(PretendClient(probe_s=10.0, cores=1.0)).probe() == STALLED


async def test_a_prompt_answer_is_progress() -> None:
    assert await _monitor(PretendClient(probe_s=0.01, cores=0.0)).probe() is None


async def test_the_monitor_marks_a_stall_and_fails_what_is_in_flight() -> None:
    client = PretendClient(probe_s=10.0, cores=0.0)
    monitor = _monitor(client)
    await monitor.start()
    try:
        deadline = time.monotonic() + 5.0
        while not monitor.stalled and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await monitor.close()
    assert monitor.stalled and not monitor.healthy
    assert len(client.failed) == 1 and "stalled" in str(client.failed[0])


def _welcome() -> p.Welcome:
    return p.Welcome(p.PROTOCOL_VERSION, "m", "/m", ["m"], 2048, "float32", True, 1.0, engine_pid=WORKER_PID)


@pytest.mark.parametrize("late", ["probe_s", "stats_s"])
async def test_a_late_answer_while_the_worker_computes_is_busy_not_stalled(late: str) -> None:
    """The EngineCore idle, the worker's loop busy with one large answer (16 sequences of 20
    log-probabilities, detokenized): the probe waits behind it, which is not a stall. Seen on a
    busy host: every client got 503 while the engine was working."""
    client = PretendClient(probe_s=0.01, cores=0.0, worker_cores=0.5)
    client.info = _welcome()
    monitor = _monitor(client)
    assert await monitor.probe() is None
    setattr(client, late, 10.0)
    assert await monitor.probe() is None
    client.worker_cores = 0.0  # and when the worker stops too (SIGSTOP), it is one
    assert await monitor.probe() == STALLED


async def test_a_late_answer_while_output_arrives_is_busy_not_stalled() -> None:
    """Output reaching requests during the wait is progress, whatever the CPU clocks say (a host
    whose cores others take gives the engine a small share)."""
    client = PretendClient(probe_s=0.01, cores=0.0, outputs_per_s=20.0)
    monitor = _monitor(client)
    assert await monitor.probe() is None
    client.stats_s = 10.0
    assert await monitor.probe() is None
    client.outputs_per_s = 0.0
    client.started = time.monotonic()
    assert await monitor.probe() == STALLED
