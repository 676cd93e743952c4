"""Which processes make up this service instance: `citadel-llm serve` (what systemd's unit
runs, and `make serve`) and everything under it. Each role sets its title to
`citadel-llm <role>`; vLLM's EngineCore runs under the engine.

Found from the process tree of this instance's own `serve`, never by scanning the host for
titles: two instances on one host must not report each other's processes. A role run on
its own (not under serve) sees only itself.
"""

from __future__ import annotations

import psutil


def role_of(proc: psutil.Process) -> str:
    try:
        title = " ".join(proc.cmdline())
        if title.startswith("citadel-llm "):
            return title.split()[1]
        if "EngineCore" in title or proc.name().startswith("VLLM"):
            return "engine-core"
        return proc.name()
    except psutil.Error:
        return "?"


def instance_processes() -> list[psutil.Process]:
    """serve and its whole tree when this process runs under serve, else this process alone."""
    me = psutil.Process()
    try:
        parent = me.parent()
        if parent is not None and role_of(parent) == "serve":
            return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        pass
    return [me]


def sibling_with_role(role: str) -> int | None:
    """The pid of the process of `role` under the same serve as this one, if any."""
    for proc in instance_processes()[1:]:
        if role_of(proc) == role:
            return proc.pid
    return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) of these processes, read from /proc; one that is gone counts 0."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def child_pids() -> list[int]:
    """This process's descendants (the engine worker's: vLLM's EngineCore)."""
    try:
        return [c.pid for c in psutil.Process().children(recursive=True)]
    except psutil.Error:
        return []
