"""systemd's notify protocol against a real datagram socket; READY only when serving."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.sd_notify import notify, watchdog_interval_s
from tests.helpers import ROOT, ServiceProcess, free_port


@pytest.fixture()
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()


def received(sock: socket.socket, timeout_s: float, until: str | None = None) -> list[str]:
    """Datagrams for timeout_s seconds, or until one contains `until`."""
    messages: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if until is not None and until in messages[-1]:
            return messages
    return messages


def wait_for_message(sock: socket.socket, needle: str, timeout_s: float) -> list[str]:
    messages = received(sock, timeout_s, until=needle)
    assert any(needle in m for m in messages), f"{needle!r} not received; got {messages}"
    return messages


def test_notify_sends_a_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    assert notify("READY=1\nSTATUS=ok", {"NOTIFY_SOCKET": path})
    assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_outside_systemd_is_a_no_op() -> None:
    assert notify("READY=1", {}) is False


def test_watchdog_interval_is_half_of_watchdog_sec() -> None:
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000"}) == 2.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


def wait_for_health_status(port: int, timeout_s: float) -> int:
    """The HTTP status of the gateway's /health once it answers at all."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing answers on port {port} after {timeout_s} s") from None
            time.sleep(0.2)


@pytest.mark.integration
def test_gateway_is_ready_only_once_the_engine_answers(notify_socket: tuple[socket.socket, str],
                                                        service: ServiceProcess, tmp_path: Path) -> None:
    sock, path = notify_socket
    env = {**service.env, "NOTIFY_SOCKET": path, "PHI_3_MINI_PORT": str(free_port()),
           "PHI_3_MINI_METRICS_PORT": str(free_port()), "PHI_3_MINI_RUNTIME_DIR": str(tmp_path / "none")}
    # no engine behind this runtime dir: no READY
    gateway = subprocess.Popen([sys.executable, "-m", "service", "gateway"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # it serves (answering /health, not ready) and keeps running: no READY is not a crash
        status = wait_for_health_status(int(env["PHI_3_MINI_PORT"]), 30)
        assert status == 503, status
        assert not any("READY=1" in m for m in received(sock, 3.0))
        assert gateway.poll() is None, "the gateway exited"
        assert wait_for_health_status(int(env["PHI_3_MINI_PORT"]), 5) == 503
    finally:
        gateway.terminate()
        gateway.wait(20)
    # the shared service's engine: READY
    env["PHI_3_MINI_RUNTIME_DIR"] = str(service.runtime_dir)
    gateway = subprocess.Popen([sys.executable, "-m", "service", "gateway"], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_message(sock, "READY=1", 30)
        gateway.send_signal(signal.SIGTERM)
        wait_for_message(sock, "STOPPING=1", 10)
        assert gateway.wait(20) == 0
    finally:
        if gateway.poll() is None:
            gateway.kill()


@pytest.mark.integration
def test_engine_sends_ready_then_watchdog_pings(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    sock, path = notify_socket
    env = {**ServiceProcess().env, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000",
           "PHI_3_MINI_RUNTIME_DIR": str(tmp_path / "run")}
    env.pop("WATCHDOG_PID", None)
    log_path = tmp_path / "engine.log"
    with open(log_path, "wb") as log:
        engine = subprocess.Popen([sys.executable, "-m", "service", "engine"], env=env, cwd=ROOT,
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        messages = received(sock, 300, until="READY=1")
        assert any("READY=1" in m for m in messages), (
            f"no READY in 300 s (engine exit code {engine.poll()}); its log ends:\n"
            + "\n".join(log_path.read_text(errors="replace").splitlines()[-40:]))
        assert (tmp_path / "run" / "engine.sock").exists()  # READY only once it serves
        assert not any("WATCHDOG=1" in m for m in messages[:messages.index(next(m for m in messages if "READY=1" in m))])
        wait_for_message(sock, "WATCHDOG=1", 5)
        engine.send_signal(signal.SIGTERM)
        wait_for_message(sock, "STOPPING=1", 15)
        assert engine.wait(60) == 0
        assert not (tmp_path / "run" / "engine.sock").exists()
    finally:
        if engine.poll() is None:
            engine.kill()
            os.waitpid(engine.pid, 0)
