"""The service's control group, read from its files: cgroup v2 first, v1's memory and cpu
controllers where a host still has them (this development machine is a v1/v2 hybrid).

Which cgroup: the one /proc/<pid>/cgroup names for the service's process, joined to the
mount `root`; when that folder is not visible (a container with its own cgroup namespace)
the mount root itself. On v2, when that cgroup has no memory limit, its nearest ancestor
that has one (the slice that holds the service's units). `root`, `proc` and `pressure` are parameters so that tests can
point them at fake folders (`CITADEL_CGROUP_ROOT` does the same for a whole service).
"""

from __future__ import annotations

import os
from pathlib import Path

from shared.protocol import CgroupSample

MB = 1 << 20
V1_NO_LIMIT = 1 << 60  # v1 writes "no limit" as a page-rounded 2**63-1


class CgroupReader:
    def __init__(self, pid: int | None = None, root: Path | None = None, proc: Path = Path("/proc"),
                 pressure: Path | None = None) -> None:
        self.pid = pid or os.getpid()
        self.root = root or Path(os.environ.get("CITADEL_CGROUP_ROOT", "/sys/fs/cgroup"))
        self.proc = proc
        self.pressure = pressure or proc / "pressure"  # system-wide PSI, v1's only pressure

    def version(self) -> int:
        if (self.root / "cgroup.controllers").exists():
            return 2
        if (self.root / "memory").is_dir():
            return 1
        return 0

    def _membership(self) -> dict[str, str]:
        """Controller (or "" for v2) -> the cgroup path of the process."""
        found: dict[str, str] = {}
        try:
            lines = (self.proc / str(self.pid) / "cgroup").read_text().splitlines()
        except OSError:
            return found
        for line in lines:
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                found[controller] = path
        return found

    def _folder(self, base: Path, rel: str) -> Path:
        folder = base / rel.lstrip("/")
        return folder if folder.is_dir() else base

    def sample(self) -> CgroupSample:
        version = self.version()
        if version == 2:
            return self._v2()
        if version == 1:
            return self._v1()
        return CgroupSample(path="", version=0)

    def _limited(self, folder: Path) -> Path:
        """The folder itself or its nearest ancestor with a memory limit: under systemd the
        limit is on citadel-llm.slice, which holds the instance's unit."""
        at = folder
        while at != self.root and self.root in at.parents:
            if _read_int(at / "memory.max") is not None:
                return at
            at = at.parent
        return folder

    def _v2(self) -> CgroupSample:
        folder = self._limited(self._folder(self.root, self._membership().get("", "/")))
        mem_some, mem_full = _pressure(folder / "memory.pressure")
        cpu_some, _ = _pressure(folder / "cpu.pressure")
        stat = _keyed(folder / "cpu.stat")
        throttled_usec = stat.get("throttled_usec")
        return CgroupSample(
            path=str(folder), version=2,
            memory_current_mb=_mb(_read_int(folder / "memory.current")),
            memory_max_mb=_mb(_read_int(folder / "memory.max")),
            memory_high_mb=_mb(_read_int(folder / "memory.high")),
            memory_pressure_some_avg10=mem_some, memory_pressure_full_avg10=mem_full,
            cpu_pressure_some_avg10=cpu_some,
            cpu_throttled_periods=stat.get("nr_throttled"),
            cpu_throttled_s=None if throttled_usec is None else throttled_usec / 1e6,
            memory_working_set_mb=_working_set(folder / "memory.current", folder / "memory.stat", "inactive_file"),
        )

    def _v1(self) -> CgroupSample:
        member = self._membership()
        memory = self._folder(self.root / "memory", member.get("memory", "/"))
        cpu_base = next((self.root / name for name in ("cpu,cpuacct", "cpu") if (self.root / name).is_dir()), None)
        stat = _keyed(self._folder(cpu_base, member.get("cpu", "/")) / "cpu.stat") if cpu_base else {}
        limit = _read_int(memory / "memory.limit_in_bytes")
        soft = _read_int(memory / "memory.soft_limit_in_bytes")
        mem_some, mem_full = _pressure(self.pressure / "memory")
        cpu_some, _ = _pressure(self.pressure / "cpu")
        throttled_ns = stat.get("throttled_time")
        return CgroupSample(
            path=str(memory), version=1,
            memory_current_mb=_mb(_read_int(memory / "memory.usage_in_bytes")),
            memory_max_mb=None if limit is None or limit >= V1_NO_LIMIT else _mb(limit),
            memory_high_mb=None if soft is None or soft >= V1_NO_LIMIT else _mb(soft),
            memory_pressure_some_avg10=mem_some, memory_pressure_full_avg10=mem_full,
            cpu_pressure_some_avg10=cpu_some,
            cpu_throttled_periods=stat.get("nr_throttled"),
            cpu_throttled_s=None if throttled_ns is None else throttled_ns / 1e9,
            memory_working_set_mb=_working_set(memory / "memory.usage_in_bytes", memory / "memory.stat",
                                               "total_inactive_file"),
        )


def _working_set(usage: Path, stat: Path, inactive_key: str) -> float | None:
    """Usage less the inactive page cache (the model files read at load stay charged to
    the group until reclaimed, but never cause a kill)."""
    used = _read_int(usage)
    if used is None:
        return None
    return _mb(max(used - _keyed(stat).get(inactive_key, 0), 0))


def _read_int(path: Path) -> int | None:
    """The number in a one-value file; None when missing or "max" (no limit)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text == "max" or not text.lstrip("-").isdigit() else int(text)


def _mb(value: int | None) -> float | None:
    return None if value is None else round(value / MB, 1)


def _keyed(path: Path) -> dict[str, int]:
    """A "key value" per line file such as cpu.stat."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[key] = int(value)
    return out


def _pressure(path: Path) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) from a PSI file; None where absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None, None
    found: dict[str, float] = {}
    for line in lines:
        kind, _, fields = line.partition(" ")
        for field in fields.split():
            name, _, value = field.partition("=")
            if name == "avg10":
                found[kind] = float(value)
    return found.get("some"), found.get("full")
