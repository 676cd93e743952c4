"""psutil's view of the service: every process of this instance (RSS, CPU over the last
interval; which processes: shared/process_tree.py) and the host's memory."""

from __future__ import annotations

import psutil

from shared.process_tree import instance_processes, role_of
from shared.protocol import ProcessSample

MB = 1 << 20


class ProcessSampler:
    def __init__(self) -> None:
        self._known: dict[int, psutil.Process] = {}  # kept so that cpu_percent measures an interval
        self.cpu_seconds_total = 0.0  # of the processes seen at the last sample

    def sample(self) -> list[ProcessSample]:
        out = []
        cpu_total = 0.0
        seen = {}
        for fresh in instance_processes():
            proc = self._known.get(fresh.pid, fresh)
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_percent(None)  # since the last call; 0.0 on the first
                    times = proc.cpu_times()
                    role = role_of(proc)
            except psutil.Error:
                continue  # gone between listing and measuring
            seen[proc.pid] = proc
            cpu_total += times.user + times.system
            out.append(ProcessSample(role=role, pid=proc.pid, rss_mb=round(rss / MB, 1), cpu_percent=round(cpu, 1)))
        self._known = seen
        self.cpu_seconds_total = cpu_total
        return out


def system_memory() -> tuple[float, float]:
    """(used %, available MB) of the host."""
    vm = psutil.virtual_memory()
    return vm.percent, round(vm.available / MB, 1)
