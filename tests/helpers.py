"""What the tests share: the local service process (service/local.py) and a bounded poll."""

from __future__ import annotations

import time

from service.local import ROOT, STARTUP_TIMEOUT_S, ServiceProcess, demo_model_dir, free_port

__all__ = ["ROOT", "STARTUP_TIMEOUT_S", "ServiceProcess", "demo_model_dir", "free_port", "wait_for"]


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll until predicate() is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
