"""One real service (engine worker, gateway, orchestrator) shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import ServiceProcess


@pytest.fixture(scope="session")
def service() -> Iterator[ServiceProcess]:
    svc = ServiceProcess().start()
    try:
        svc.wait_healthy()
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def base_url(service: ServiceProcess) -> str:
    return service.base_url
