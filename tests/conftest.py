"""One real service (engine worker, gateway, orchestrator) shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import ServiceProcess, running


@pytest.fixture(scope="session")
def service() -> Iterator[ServiceProcess]:
    # the one compiled engine of the suite, in the demo model's own layout: what `make serve` runs
    with running(ServiceProcess(enforce_eager="false", engine_core="auto")) as svc:
        yield svc


@pytest.fixture(scope="session")
def base_url(service: ServiceProcess) -> str:
    return service.base_url
