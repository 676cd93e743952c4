"""engine_threads: how many OpenMP threads the engine's forward pass gets, on which cores, and
what the front end keeps. Pure logic over a pretended set of allowed CPUs."""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
    effect = optimization_settings(config)["cpu_optimization"]["effect"]
    assert (f"bound to {len(expected)} of the {cores} allotted cores" if threads != "0"
            else f"to {len(expected)} for a smaller one") in effect


def _weights_header_only(folder: Path, parameters: int) -> Path:
    """A model folder whose safetensors header declares `parameters` (no weights written:
    the count is read from the header)."""
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [parameters], "data_offsets": [0, 4 * parameters]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


@pytest.mark.parametrize(("parameters", "cores", "expected"), [
    (3_400_000, "2", [1]),  # the demo model's size: one core stays with the front end
    (135_000_000, "2", [0, 1]),  # SmolLM2-135M: the forward pass gets both
    (3_800_000_000, "4", [0, 1, 2, 3]),  # Phi-3-mini
    (49_999_999, "4", [1, 2, 3]),
])
def test_by_default_a_large_model_gets_every_core(tmp_path: Path, parameters: int, cores: str,
                                                  expected: list[int]) -> None:
    model = _weights_header_only(tmp_path / "model", parameters)
    config = _config(cpu_cores=cores, model_path=str(model))
    assert settings.configured_parameters(config) == parameters
    assert settings.engine_cpu_list(config) == expected
    assert settings.prepare_environment(config, cpu=True)["OMP_NUM_THREADS"] == str(len(expected))
    # an explicit setting wins over the size
    assert settings.engine_cpu_list(_config(cpu_cores=cores, model_path=str(model), engine_threads="1")) == [int(cores) - 1]


def test_a_missing_model_counts_as_the_small_demo_model(tmp_path: Path) -> None:
    config = _config(cpu_cores="2", model_path=str(tmp_path / "absent"))
    assert settings.configured_parameters(config) == 0
    assert settings.engine_cpu_list(config) == [1]


def test_a_negative_thread_count_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="engine_threads"):
        _config(engine_threads="-1")


@pytest.mark.parametrize("weights", [b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}", b"\x02\x00", b"\x04\x00\x00\x00\x00\x00\x00\x00\xcb\xcb\xcb\xcb"])
def test_unreadable_weights_count_as_small_and_leave_the_failure_to_the_start(tmp_path: Path, weights: bytes) -> None:
    """The thread count is chosen before the weights are verified: a broken header must not
    crash the engine there (it would exit 1 and be restarted) but reach the start's own check."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(weights)
    config = _config(cpu_cores="2", model_path=str(model))
    assert settings.configured_parameters(config) == 0
    assert settings.prepare_environment(config, cpu=True)["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize(("parameters", "setting", "cpu", "expected"), [
    (3_400_000, "auto", True, False),  # the demo model: vLLM's own process (two GILs beat one process)
    (135_000_000, "auto", True, True),  # SmolLM2-135M: one process, one copy of vLLM and torch fewer
    (3_800_000_000, "auto", True, True),  # Phi-3-mini
    (3_400_000, "thread", True, True),  # an explicit setting wins over the size
    (135_000_000, "process", True, False),
    (3_800_000_000, "auto", False, False),  # a GPU host keeps vLLM's layout
    (3_800_000_000, "thread", False, False),
])
def test_the_engine_core_runs_on_a_thread_for_a_large_model(parameters: int, setting: str, cpu: bool,
                                                             expected: bool) -> None:
    from shared.optimizations import engine_core_on_a_thread

    config = _config(engine_core=setting)
    assert engine_core_on_a_thread(config, parameters, cpu) is expected
    effect = optimization_settings(config)["engine_core"]["effect"]
    assert ("50M parameters or more" in effect) is (setting == "auto")


def test_an_unknown_engine_core_layout_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="engine_core"):
        _config(engine_core="fiber")
