"""`citadel-llm serve`: starts the engine worker, the gateway and the orchestrator as child
processes, restarts any that dies or stops answering its watchdog, and stops them all, in
order and with deadlines, on SIGTERM or SIGINT.

To its children `serve` is what systemd is to a unit: each gets its own NOTIFY_SOCKET and
WATCHDOG_USEC. To systemd it is one `Type=notify` unit, ready once the gateway is.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from service.notify_socket import NotifySocket
from shared import sd_notify
from shared.config import Phi3MiniConfig
from shared.logging import get_logger
from shared.runtime_dir import UnsafeRuntimeDir, ensure_private_dir

log = get_logger(__name__)

ROLES = ("engine", "gateway", "orchestrator")
STOP_ORDER = ("gateway", "orchestrator", "engine")  # stop taking requests first, engine last
# Beyond config.stop_timeout_s (the gateway's whole graceful stop), what each role gets after
# SIGTERM before SIGKILL: the engine stops after the gateway, with nothing left in flight.
STOP_MARGIN_S = {"gateway": 5.0, "orchestrator": 5.0, "engine": 10.0}
KILL_WAIT_S = 5.0  # after SIGKILL of a child's group, for the kernel to reap it
POLL_S = 0.2
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a child ready and up this long has its backoff reset
START_ATTEMPTS = 3  # a child that dies this many times in a row before READY=1 stops the service
# A child's exit code for a start that cannot succeed (the engine's failed start: bad
# weights, a setting vLLM refuses; an unsafe runtime dir; a bad command line): restarting
# it would only fail again, so serve stops everything and exits with it, which the unit's
# RestartPreventExitStatus=2 does not restart either.
EXIT_CANNOT_START = 2
DEFAULT_CHILD_WATCHDOG_S = 60.0  # without a WatchdogSec= of our own (outside systemd)
# Under memory pressure the kernel's choice: the engine (restarted in seconds), not the
# gateway or serve. Raising one's own score needs no privilege.
OOM_SCORE_ADJ = {"engine": 500}
_PR_SET_PDEATHSIG = 1


def _child_setup(oom_score_adj: int | None) -> Callable[[], None]:
    def setup() -> None:
        """In the child before exec: get SIGTERM when `serve` dies, even by kill -9."""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if oom_score_adj is not None:
            try:
                with open("/proc/self/oom_score_adj", "w") as f:
                    f.write(str(oom_score_adj))
            except OSError:
                pass

    return setup


@dataclass
class Child:
    role: str
    notify: NotifySocket
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = 0
    ready: bool = False  # sent READY=1 and not STOPPING=1: its watchdog is armed
    was_ready: bool = False  # this process sent READY=1 at some point
    unready_deaths: int = 0  # processes in a row that died before READY=1
    last_ping: float = 0.0  # monotonic time of its last READY=1 or WATCHDOG=1

    def start(self, argv: list[str], watchdog_s: float) -> None:
        self.notify.receive()  # whatever the previous process left unread is not this one's
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}
        env.pop("WATCHDOG_PID", None)  # ours; without it the child takes the watchdog as its own
        self.proc = subprocess.Popen(
            argv, env=env, start_new_session=True,
            preexec_fn=_child_setup(OOM_SCORE_ADJ.get(self.role)),  # noqa: PLW1509
        )
        self.started_at = time.monotonic()
        self.ready = self.was_ready = False
        log.info("child started", role=self.role, pid=self.proc.pid, restarts=self.restarts)

    def kill_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # the child leads its own group: takes its children too
        except ProcessLookupError:
            pass


def child_argv(role: str, config_path: str | None) -> list[str]:
    # service.cli as the main module: vLLM's spawned EngineCore runs it again (see lean_imports)
    argv = [sys.executable, "-m", "service.cli", role]
    if config_path:
        argv += ["--config", config_path]
    return argv


def child_watchdog_s() -> float:
    """Our own WatchdogSec= when systemd set one, else the default."""
    interval = sd_notify.watchdog_interval_s()
    return interval * 2 if interval else DEFAULT_CHILD_WATCHDOG_S


def run_serve(config: Phi3MiniConfig, config_path: str | None) -> int:
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)  # only record it: the loop below acts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runtime_dir = ensure_private_dir(config.socket_dir())
    except UnsafeRuntimeDir as exc:
        log.error("serve cannot start", error=str(exc))
        return 2
    watchdog_s = child_watchdog_s()
    children = {role: Child(role, NotifySocket(_notify_path(runtime_dir, role))) for role in ROLES}
    for child in children.values():
        child.start(child_argv(child.role, config_path), watchdog_s)
    systemd = SystemdLink()
    exit_code = 0
    try:
        while not stop_signal:
            # 1. wait for a child's message, at most one poll interval
            select.select([c.notify for c in children.values()], [], [], POLL_S)
            now = time.monotonic()
            # 2. what the children said; whose watchdog ran out; who died
            for child in children.values():
                _read_notify(child, now)
                _check_watchdog(child, now, watchdog_s)
            if _restart_dead(children, config_path, watchdog_s) == EXIT_CANNOT_START:
                exit_code = EXIT_CANNOT_START
                break
            # 3. what we tell systemd
            systemd.update(children, now)
    finally:
        log.info("serve stopping", signal=stop_signal[0] if stop_signal else None)
        sd_notify.notify("STOPPING=1\nSTATUS=stopping")
        for role in STOP_ORDER:
            _stop_child(children[role], stop_timeout_s(role, config.stop_timeout_s))
        for child in children.values():
            child.notify.close()
    log.info("serve stopped", exit_code=exit_code)
    return exit_code


def stop_timeout_s(role: str, graceful_s: float) -> float:
    """How long a role gets after SIGTERM before SIGKILL: the gateway and the engine drain
    for up to the graceful stop (config.stop_timeout_s), the orchestrator does not."""
    return STOP_MARGIN_S[role] + (graceful_s if role != "orchestrator" else 0.0)


def stop_budget_s(graceful_s: float) -> float:
    """The longest serve's whole stop can take: every role at its deadline, then killed."""
    return sum(stop_timeout_s(role, graceful_s) + KILL_WAIT_S for role in STOP_ORDER)


def _notify_path(runtime_dir: Path, role: str) -> Path:
    return runtime_dir / f"notify-{role}.sock"


class SystemdLink:
    """READY=1 once the gateway is (it waits for the engine's answer), STATUS= on every
    change, WATCHDOG=1 every half WatchdogSec= while the loop turns. A no-op outside systemd."""

    def __init__(self) -> None:
        self.ping_every_s = sd_notify.watchdog_interval_s()
        self.last_ping = 0.0
        self.ready_sent = False
        self.status = ""

    def update(self, children: dict[str, Child], now: float) -> None:
        waiting = [role for role, child in children.items() if not child.ready]
        status = f"waiting for: {', '.join(waiting)}" if waiting else "serving"
        lines = []
        if children["gateway"].ready and not self.ready_sent:
            lines.append("READY=1")
            self.ready_sent = True
        if status != self.status:
            lines.append(f"STATUS={status}")
            self.status = status
        if self.ping_every_s is not None and now - self.last_ping >= self.ping_every_s:
            lines.append("WATCHDOG=1")
            self.last_ping = now
        if lines:
            sd_notify.notify("\n".join(lines))


def _read_notify(child: Child, now: float) -> None:
    for message in child.notify.receive():
        if child.proc is None or child.proc.poll() is not None:
            continue  # sent by a process that is gone
        if message.get("READY") == "1" and not child.ready:
            child.ready = child.was_ready = True
            child.last_ping = now
            log.info("child ready", role=child.role, pid=child.proc.pid, status=message.get("STATUS"))
        if message.get("WATCHDOG") == "1":
            child.last_ping = now
        if message.get("STOPPING") == "1":
            child.ready = False  # a child on its way out is not held to its watchdog


def _check_watchdog(child: Child, now: float, watchdog_s: float) -> None:
    proc = child.proc
    if proc is None or not child.ready or now - child.last_ping <= watchdog_s:
        return
    log.error("child watchdog timeout: killing it", role=child.role, pid=proc.pid, watchdog_s=watchdog_s,
              silent_s=round(now - child.last_ping, 1))
    child.ready = False
    child.kill_group(signal.SIGKILL)  # then restarted below, like any death


def _restart_dead(children: dict[str, Child], config_path: str | None, watchdog_s: float) -> int | None:
    """Restart the children that died (after their backoff). EXIT_CANNOT_START when one
    exited with it, or died START_ATTEMPTS times in a row before it was ready (e.g. killed for
    memory while loading, which another start only repeats): then nothing is restarted."""
    now = time.monotonic()
    for child in children.values():
        proc = child.proc
        if proc is None:
            if now >= child.restart_at:
                child.restarts += 1
                child.start(child_argv(child.role, config_path), watchdog_s)
            continue
        code = proc.poll()
        if code is None:
            continue
        child.kill_group(signal.SIGKILL)  # leave no orphans behind (e.g. vLLM's EngineCore)
        child.proc, child.ready = None, False
        if code == EXIT_CANNOT_START:
            log.error("child cannot start: stopping the service", role=child.role, pid=proc.pid, exit_code=code)
            return EXIT_CANNOT_START
        child.unready_deaths = 0 if child.was_ready else child.unready_deaths + 1
        if child.unready_deaths >= START_ATTEMPTS:
            log.error("child cannot start: stopping the service", role=child.role, pid=proc.pid, exit_code=code,
                      why=_death(code))
            return EXIT_CANNOT_START
        uptime = now - child.started_at
        child.failures = 0 if child.was_ready and uptime > STABLE_AFTER_S else child.failures + 1
        delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S) - 1)]
        log.error("child exited; restarting", role=child.role, pid=proc.pid, exit_code=code,
                  uptime_s=round(uptime, 1), restart_in_s=delay)
        child.restart_at = now + delay
    return None


def _death(code: int) -> str:
    if code == -signal.SIGKILL:
        return (f"died {START_ATTEMPTS} times before it was ready, the last by SIGKILL: the kernel's OOM "
                "killer at a memory limit (memory_gb, systemd's MemoryMax) kills this way")
    return f"died {START_ATTEMPTS} times before it was ready, the last with exit code {code}"


def _stop_child(child: Child, timeout_s: float) -> None:
    proc = child.proc
    if proc is None or proc.poll() is not None:
        child.kill_group(signal.SIGKILL)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        log.error("child did not stop in time: killing", role=child.role, pid=proc.pid)
    child.kill_group(signal.SIGKILL)
    try:
        proc.wait(KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.error("child survived SIGKILL", role=child.role, pid=proc.pid)
    log.info("child stopped", role=child.role, exit_code=proc.returncode)
