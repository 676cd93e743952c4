"""Entry of the efficiency orchestrator process (`citadel-llm orchestrator`).

Every `metrics_collection_interval` seconds: sample the service's processes (psutil) and
its cgroup, ask the engine worker for its stats over the control socket (shared/engine_client.py), let the
`EfficiencyManager` decide, send new limits (efficiency mode only), and write the report
the gateway shows on /efficiency. When the worker is not reachable it keeps sampling and
reports that; the worker keeps the last limits it was given.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import msgspec

from orchestrator.cgroup import CgroupReader
from orchestrator.policy import EfficiencyManager, Observation
from orchestrator.processes import ProcessSampler, system_memory
from shared import protocol as p
from shared import sd_notify
from shared.config import Phi3MiniConfig
from shared.engine_client import EngineClient, EngineUnavailable, RequestFailed
from shared.logging import get_logger
from shared.runtime_dir import UnsafeRuntimeDir, ensure_private_dir, write_private_file

log = get_logger(__name__)

GB_MB = 1024.0


def run_orchestrator(config: Phi3MiniConfig) -> int:
    return asyncio.run(_main(config))


class Orchestrator:
    def __init__(self, config: Phi3MiniConfig) -> None:
        self.config = config
        self.interval_s = config.metrics_collection_interval
        self.window_s = max(2.0, 2 * self.interval_s)  # latency percentiles over this much
        self.manager = EfficiencyManager(config)
        self.control = EngineClient(config.control_socket_path(), role="orchestrator")
        self.timeout_s = min(2.0, max(0.5, self.interval_s))  # for each reply
        self.processes = ProcessSampler()
        self.cgroup = CgroupReader()
        self.report_path = config.efficiency_report_path()
        self._last: tuple[float, p.EngineStats, float] | None = None  # (monotonic, stats, cpu seconds)
        self._refused_total: int | None = None

    async def tick(self) -> p.EfficiencyReport:
        procs = self.processes.sample()
        cgroup = self.cgroup.sample()
        used_pct, available_mb = system_memory()
        limit_mb = self.config.memory_gb * GB_MB
        if cgroup.memory_max_mb is not None:
            limit_mb = min(limit_mb, cgroup.memory_max_mb)
        used_mb = sum(s.rss_mb for s in procs)
        if cgroup.memory_current_mb is not None and cgroup.memory_max_mb is not None:
            # the figure the kernel enforces the limit on, less the page cache it reclaims first
            used_mb = cgroup.memory_working_set_mb if cgroup.memory_working_set_mb is not None \
                else cgroup.memory_current_mb
        report = p.EfficiencyReport(
            at=time.time(), interval_s=self.interval_s, efficiency_mode=self.config.efficiency_mode,
            connected=False, processes=procs, cgroup=cgroup, system_memory_used_percent=used_pct,
            system_memory_available_mb=available_mb, memory_limit_mb=round(limit_mb, 1), memory_used_mb=round(used_mb, 1),
        )
        try:
            stats = await self.control.stats(self.timeout_s, self.window_s)
        except (EngineUnavailable, RequestFailed, TimeoutError) as exc:
            log.debug("engine control socket unavailable", error=str(exc))
            self._last = None
        else:
            report.connected, report.engine_pid = True, self.control.info.engine_pid if self.control.info else 0
            self._rates(report, stats, used_mb)
            decision = self.manager.decide(Observation(
                max_num_seqs=stats.max_num_seqs, max_num_batched_tokens=stats.max_num_batched_tokens,
                max_num_seqs_ceiling=stats.max_num_seqs_ceiling,
                max_num_batched_tokens_ceiling=stats.max_num_batched_tokens_ceiling,
                in_flight=stats.in_flight, queued=stats.queued, refused=self._refused_since(stats),
                window_requests=stats.window_requests,
                service_p95_s=stats.service_p95_s, e2e_p95_s=stats.e2e_p95_s, mean_service_s=stats.mean_service_s,
                memory_used_mb=used_mb, memory_limit_mb=limit_mb,
                memory_pressure=cgroup.memory_pressure_some_avg10,
            ))
            if decision.action != "hold":
                log.info("efficiency decision", action=decision.action, reason=decision.reason,
                         max_num_seqs=decision.max_num_seqs, max_num_batched_tokens=decision.max_num_batched_tokens,
                         inputs=decision.inputs)
                try:
                    await self.control.set_limits(decision.max_num_seqs, decision.max_num_batched_tokens,
                                                  f"{decision.action}: {decision.reason}", self.timeout_s)
                except (EngineUnavailable, RequestFailed, TimeoutError) as exc:
                    log.warning("could not set limits", error=str(exc))
        report.decisions = list(self.manager.decisions)[-20:]
        _write_atomically(self.report_path, msgspec.json.encode(report))
        return report

    def _refused_since(self, stats: p.EngineStats) -> int:
        total = sum(stats.refused_total.values())
        before, self._refused_total = self._refused_total, total
        return max(total - before, 0) if before is not None else 0

    def _rates(self, report: p.EfficiencyReport, stats: p.EngineStats, used_mb: float) -> None:
        now, cpu_s = time.monotonic(), self.processes.cpu_seconds_total
        last, self._last = self._last, (now, stats, cpu_s)
        if last is None:
            return
        then, before, cpu_before = last
        dt = now - then
        if dt <= 0:
            return
        done = stats.requests_finished_total - before.requests_finished_total
        generated = stats.generation_tokens_total - before.generation_tokens_total
        tokens = generated + stats.prompt_tokens_total - before.prompt_tokens_total
        cpu = max(cpu_s - cpu_before, 0.0)
        report.requests_per_s = round(max(done, 0) / dt, 2)
        report.tokens_per_s = round(max(tokens, 0) / dt, 1)
        report.generated_tokens_per_s = round(max(generated, 0) / dt, 1)
        report.cpu_seconds_per_s = round(cpu / dt, 3)
        report.tokens_per_cpu_second = round(max(tokens, 0) / cpu, 1) if cpu > 0 else 0.0
        gb_s = used_mb / GB_MB * dt
        report.tokens_per_gb_second = round(max(tokens, 0) / gb_s, 1) if gb_s > 0 else 0.0


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        ensure_private_dir(path.parent)
        write_private_file(path, data)
    except UnsafeRuntimeDir as exc:
        log.error("report not written: unsafe runtime dir", error=str(exc))
    except OSError as exc:
        log.debug("report not written", path=str(path), error=str(exc))


async def _main(config: Phi3MiniConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orchestrator = Orchestrator(config)
    log.info("orchestrator started", efficiency_mode=config.efficiency_mode, interval_s=orchestrator.interval_s,
             target_latency_ms=config.target_latency_ms, cgroup_version=orchestrator.cgroup.version(),
             status=orchestrator.manager.get_optimization_status())
    await orchestrator.control.start()
    sd_notify.notify("READY=1")
    try:
        while not stop.is_set():
            started = loop.time()
            try:
                await orchestrator.tick()
            except Exception:  # one bad sample must not end the loop
                log.exception("orchestrator sample failed")
            sd_notify.notify("WATCHDOG=1")
            delay = max(0.0, orchestrator.interval_s - (loop.time() - started))
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                pass
    finally:
        await orchestrator.control.close()
    log.info("orchestrator stopped")
    return 0
