"""`serve` as its children's systemd: their private notify sockets, READY=1, the watchdog, and
what serve itself tells systemd."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import pytest

from service.notify_socket import NotifySocket
from service.supervisor import (
    EXIT_CANNOT_START,
    START_ATTEMPTS,
    Child,
    SystemdLink,
    _check_watchdog,
    _read_notify,
    _restart_dead,
)
from shared.sd_notify import notify


def test_notify_socket_is_private_and_reads_every_message(tmp_path: Path) -> None:
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        assert stat.S_IMODE(os.stat(sock.path).st_mode) == 0o600
        env = {"NOTIFY_SOCKET": str(sock.path)}
        assert notify("READY=1\nSTATUS=model loaded", env) and notify("WATCHDOG=1", env)
        assert sock.receive() == [{"READY": "1", "STATUS": "model loaded"}, {"WATCHDOG": "1"}]
        assert sock.receive() == []  # never blocks
    finally:
        sock.close()
    assert not sock.path.exists()


# Killed as the OOM killer kills: SIGKILL, optionally after READY=1.
KILLED = """
import os, signal, sys, time
from shared.sd_notify import notify
if sys.argv[1] == "ready":
    notify("READY=1")
    time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _deaths(tmp_path: Path, when: str) -> list[int | None]:
    """START_ATTEMPTS processes of one child, each killed (`when` "ready": after READY=1), and
    what the supervisor decides after each death."""
    child = Child("engine", NotifySocket(tmp_path / "notify-engine.sock"))
    decisions = []
    try:
        for _ in range(START_ATTEMPTS):
            child.start([sys.executable, "-c", KILLED, when], watchdog_s=5.0)
            assert child.proc is not None
            deadline = time.monotonic() + 30
            while child.proc.poll() is None and time.monotonic() < deadline:
                _read_notify(child, time.monotonic())
                time.sleep(0.02)
            assert child.proc.wait(30) == -9
            decisions.append(_restart_dead({"engine": child}, None, 5.0))  # restarts are ours, above
    finally:
        child.notify.close()
    return decisions


def test_a_child_killed_before_it_is_ready_again_and_again_stops_the_service(tmp_path: Path) -> None:
    """An engine the OOM killer kills while loading (weights over a cgroup's limit) would only
    be killed again: after START_ATTEMPTS such deaths the service stops (exit 2) instead of
    looping; a child that was ready before it died is restarted every time."""
    assert _deaths(tmp_path, "loading") == [None] * (START_ATTEMPTS - 1) + [EXIT_CANNOT_START]
    assert _deaths(tmp_path, "ready") == [None] * START_ATTEMPTS


# A child that says READY=1 (with the watchdog interval it was given), pings twice, then hangs.
HANGS_AFTER_TWO_PINGS = """
import time
from shared.sd_notify import notify, watchdog_interval_s
interval = watchdog_interval_s()
notify(f"READY=1\\nSTATUS={interval}")
for _ in range(2):
    time.sleep(interval)
    notify("WATCHDOG=1")
time.sleep(60)
"""


def test_a_child_that_stops_pinging_is_killed_after_its_watchdog(tmp_path: Path) -> None:
    child = Child("engine", NotifySocket(tmp_path / "notify-engine.sock"))
    child.start([sys.executable, "-c", HANGS_AFTER_TWO_PINGS], watchdog_s=1.0)
    assert child.proc is not None
    pings: list[float] = []
    try:
        deadline = time.monotonic() + 20
        while child.proc.poll() is None and time.monotonic() < deadline:
            now = time.monotonic()
            before = child.last_ping
            _read_notify(child, now)
            if child.last_ping != before:
                pings.append(now)
            _check_watchdog(child, now, 1.0)
            time.sleep(0.05)
        killed_at = time.monotonic()
        assert child.proc.returncode == -9  # SIGKILL to its group
        assert len(pings) == 3  # READY=1 and two pings: the child got WATCHDOG_USEC (half of it: 0.5 s)
        assert 1.0 <= killed_at - pings[-1] < 10.0  # not before its watchdog; the loop's polls are the rest
        assert not child.ready  # disarmed until a new process says READY=1
    finally:
        child.kill_group(9)
        child.proc.wait(5)
        child.notify.close()


def test_serve_is_ready_for_systemd_once_the_gateway_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    systemd = NotifySocket(tmp_path / "systemd.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(systemd.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    children = {role: Child(role, NotifySocket(tmp_path / f"{role}.sock")) for role in ("engine", "gateway", "orchestrator")}
    try:
        link = SystemdLink()
        children["orchestrator"].ready = True
        link.update(children, now=10.0)
        assert systemd.receive() == [{"STATUS": "waiting for: engine, gateway", "WATCHDOG": "1"}]
        children["engine"].ready = children["gateway"].ready = True
        link.update(children, now=10.5)  # the next ping is due a second (half of WatchdogSec) after the last
        assert systemd.receive() == [{"READY": "1", "STATUS": "serving"}]
        link.update(children, now=11.0)
        assert systemd.receive() == [{"WATCHDOG": "1"}]
        children["engine"].ready = False  # died: serve restarts it; the unit stays up
        link.update(children, now=11.1)
        assert systemd.receive() == [{"STATUS": "waiting for: engine"}]
    finally:
        for child in children.values():
            child.notify.close()
        systemd.close()
