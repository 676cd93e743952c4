"""A memory cgroup of its own for a service under test, as systemd's slice would give it:
cgroup v2 where the memory controller is there (production hosts), else v1 (this machine's
hybrid). Needs root; the tests that use it skip without."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("CITADEL_CGROUP_ROOT", "/sys/fs/cgroup"))


@dataclass(frozen=True)
class MemoryGroup:
    path: Path
    version: int

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int:
        """Processes the kernel killed in this group for memory."""
        events = self.path / ("memory.events" if self.version == 2 else "memory.oom_control")
        match = re.search(r"^oom_kill (\d+)$", events.read_text(), re.M)
        return int(match.group(1)) if match else 0

    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text())

    def join(self) -> None:
        """Put the calling process in the group (a child's preexec_fn: all it starts follows)."""
        self.procs.write_text(str(os.getpid()))


def _v2() -> bool:
    controllers = ROOT / "cgroup.controllers"
    return controllers.exists() and "memory" in controllers.read_text().split()


def unavailable() -> str:
    """Why no memory cgroup can be made here, or "" when one can."""
    if os.geteuid() != 0:
        return "a memory cgroup needs root"
    if not _v2() and not (ROOT / "memory" / "memory.limit_in_bytes").exists():
        return "no cgroup memory controller here"
    return ""


@contextmanager
def limited_memory(limit_bytes: int) -> Iterator[MemoryGroup]:
    """A fresh group with a hard memory limit and no swap, v2 where the memory controller is
    there, else v1; removed once its processes are gone. Check unavailable() first."""
    if _v2():
        group = MemoryGroup(ROOT / f"citadel-test-{uuid.uuid4().hex[:8]}", 2)
        (ROOT / "cgroup.subtree_control").write_text("+memory")
        group.path.mkdir()
        (group.path / "memory.max").write_text(str(limit_bytes))
        (group.path / "memory.swap.max").write_text("0")
    else:
        group = MemoryGroup(ROOT / "memory" / f"citadel-test-{uuid.uuid4().hex[:8]}", 1)
        group.path.mkdir()
        (group.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = group.path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit_bytes))
    try:
        yield group
    finally:
        deadline = time.monotonic() + 30
        while group.procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            group.path.rmdir()
        except OSError:
            pass


@contextmanager
def memory_group(limit_bytes: int) -> Iterator[MemoryGroup]:
    """limited_memory for a test: skipped where no group can be made."""
    if reason := unavailable():
        pytest.skip(reason)
    with limited_memory(limit_bytes) as group:
        yield group
