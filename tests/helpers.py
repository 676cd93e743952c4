"""What the tests share: the local service process (service/local.py), eager and with the
EngineCore on a thread unless a test asks otherwise, and a bounded poll."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from service import local
from service.local import ROOT, STARTUP_TIMEOUT_S, busy_cores, demo_model_dir, free_port, longest_tokens

__all__ = ["ROOT", "STARTUP_TIMEOUT_S", "ServiceProcess", "demo_model_dir", "busy_cores", "free_port", "longest_tokens", "running", "wait_for"]


class ServiceProcess(local.ServiceProcess):
    """`citadel-llm serve` for a test: eager (`enforce_eager`) and with vLLM's EngineCore on a
    thread of the engine worker (`engine_core: thread`) unless told otherwise. A cold
    torch.compile costs ~30 s a start, spawning the EngineCore's own process (which imports vLLM
    and torch again) ~6 s, and the suite starts a dozen engines. The shared service
    (tests/conftest.py) runs as `make serve` does, compiled with the demo model's own layout
    (the EngineCore in its process); so do the tests that kill, stop or look for that process."""

    def __init__(self, **settings: str) -> None:
        super().__init__(**{"enforce_eager": "true", "engine_core": "thread", **settings})


@contextmanager
def running(svc: ServiceProcess) -> Iterator[ServiceProcess]:
    """The service started and healthy for the block, stopped after it (a fixture's body)."""
    svc.start()
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


def wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll until predicate() is true; fail the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

