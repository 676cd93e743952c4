"""engine_threads: how many OpenMP threads the engine's forward pass gets, on which cores, and
what the front end keeps. Pure logic over a pretended set of allowed CPUs."""

from __future__ import annotations

import pytest

from service.engine import settings
from shared.config import ConfigError, load_config
from shared.optimizations import optimization_settings


def _config(**env: str):  # type: ignore[no-untyped-def]
    return load_config(None, environ={f"PHI_3_MINI_{k.upper()}": v for k, v in env.items()})


@pytest.fixture(autouse=True)
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "_ALLOWED_AT_START", frozenset({0, 1, 2, 3}))


@pytest.mark.parametrize(("cores", "threads", "expected"), [
    ("2", "0", [1]),  # the default: one core left to the gateway and scheduler
    ("4", "0", [1, 2, 3]),
    ("1", "0", [0]),
    ("2", "2", [0, 1]),  # the forward pass on every allotted core
    ("2", "1", [1]),
    ("2", "8", [0, 1]),  # never more than cpu_cores
])
def test_engine_threads_pick_the_cores(cores: str, threads: str, expected: list[int]) -> None:
    config = _config(cpu_cores=cores, engine_threads=threads)
    assert settings.engine_cpu_list(config) == expected
    env = settings.prepare_environment(config, cpu=True)
    assert env["OMP_NUM_THREADS"] == str(len(expected))
    assert env["OMP_PLACES"] == "{" + ",".join(map(str, expected)) + "}"
    assert f"bound to {len(expected)} of the {cores} allotted cores" in optimization_settings(config)["cpu_optimization"]["effect"]


def test_a_negative_thread_count_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="engine_threads"):
        _config(engine_threads="-1")
