"""`citadel-llm serve`: starts the engine worker, the gateway and the orchestrator as child
processes, restarts any that dies, and stops them all, in order and with deadlines, on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from shared.logging import get_logger

log = get_logger(__name__)

ROLES = ("engine", "gateway", "orchestrator")
STOP_ORDER = ("gateway", "orchestrator", "engine")  # stop taking requests first, engine last
STOP_TIMEOUT_S = {"gateway": 15.0, "orchestrator": 5.0, "engine": 20.0}
POLL_S = 0.2
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_AFTER_S = 60.0  # a child up this long has its backoff reset
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when `serve` dies, even by kill -9."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Child:
    role: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    restarts: int = field(default=0)

    def start(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, start_new_session=True, preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        self.started_at = time.monotonic()
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


def run_serve(config_path: str | None) -> int:
    stop_signal: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)  # only record it: the loop below acts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    children = {role: Child(role) for role in ROLES}
    for child in children.values():
        child.start(child_argv(child.role, config_path))
    try:
        while not stop_signal:
            time.sleep(POLL_S)
            _restart_dead(children, config_path)
    finally:
        log.info("serve stopping", signal=stop_signal[0] if stop_signal else None)
        for role in STOP_ORDER:
            _stop_child(children[role])
    log.info("serve stopped")
    return 0


def _restart_dead(children: dict[str, Child], config_path: str | None) -> None:
    now = time.monotonic()
    for child in children.values():
        proc = child.proc
        if proc is None:
            if now >= child.restart_at:
                child.restarts += 1
                child.start(child_argv(child.role, config_path))
            continue
        code = proc.poll()
        if code is None:
            continue
        child.kill_group(signal.SIGKILL)  # leave no orphans behind (e.g. vLLM's EngineCore)
        uptime = now - child.started_at
        child.failures = 0 if uptime > STABLE_AFTER_S else child.failures + 1
        delay = RESTART_BACKOFF_S[min(child.failures, len(RESTART_BACKOFF_S) - 1)]
        log.error("child exited; restarting", role=child.role, pid=proc.pid, exit_code=code,
                  uptime_s=round(uptime, 1), restart_in_s=delay)
        child.proc = None
        child.restart_at = now + delay


def _stop_child(child: Child) -> None:
    proc = child.proc
    if proc is None or proc.poll() is not None:
        child.kill_group(signal.SIGKILL)
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT_S[child.role])
    except subprocess.TimeoutExpired:
        log.error("child did not stop in time: killing", role=child.role, pid=proc.pid)
    child.kill_group(signal.SIGKILL)
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:
        log.error("child survived SIGKILL", role=child.role, pid=proc.pid)
    log.info("child stopped", role=child.role, exit_code=proc.returncode)
