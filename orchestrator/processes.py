"""psutil's view of the service: every process of it (RSS, CPU over the last interval) and the
host's memory.

Which processes: under `citadel-llm serve` (also what systemd's unit runs), the supervisor
(this process's parent) and everything under it; run alone, the processes whose title starts
with "citadel-llm" (the roles set their titles), and their children.
"""

from __future__ import annotations

import psutil

from shared.protocol import ProcessSample

MB = 1 << 20


def _role(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except psutil.Error:
        return "?"
    title = " ".join(cmd)
    if title.startswith("citadel-llm "):
        return title.split()[1]
    if "EngineCore" in title or proc.name().startswith("VLLM"):
        return "engine-core"
    return proc.name()


class ProcessSampler:
    def __init__(self) -> None:
        self._known: dict[int, psutil.Process] = {}  # kept so that cpu_percent measures an interval
        self.cpu_seconds_total = 0.0  # of the processes seen at the last sample

    def _service(self) -> list[psutil.Process]:
        me = psutil.Process()
        parent = me.parent()
        if parent is not None and _role(parent) == "serve":
            return [parent, *parent.children(recursive=True)]
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info["cmdline"] or []
            if cmd and cmd[0].startswith("citadel-llm"):
                found.append(proc)
                found.extend(proc.children(recursive=True))
        return list({p.pid: p for p in found}.values()) or [me]

    def sample(self) -> list[ProcessSample]:
        out = []
        cpu_total = 0.0
        seen = {}
        for fresh in self._service():
            proc = self._known.get(fresh.pid, fresh)
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_percent(None)  # since the last call; 0.0 on the first
                    times = proc.cpu_times()
                    role = _role(proc)
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
