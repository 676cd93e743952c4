"""`Phi3MiniService(config).get_model_info()` with no engine to ask: the dtype it reports is the
one the engine would serve in on this host, read here from /proc/cpuinfo on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.model_info import Phi3MiniService
from shared.config import Phi3MiniConfig


def _cpu_has_bf16() -> bool:
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _no_gpu() -> bool:
    return not Path("/dev/nvidiactl").exists() and not Path("/dev/kfd").exists()


@pytest.mark.skipif(not _no_gpu(), reason="a GPU host: vLLM picks the dtype there")
def test_auto_dtype_without_an_engine_is_what_a_cpu_host_serves(tmp_path: Path) -> None:
    info = Phi3MiniService(Phi3MiniConfig(dtype="auto", runtime_dir=str(tmp_path))).get_model_info()
    assert info["engine_running"] is False
    assert info["dtype"] == ("bfloat16" if _cpu_has_bf16() else "float32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_dtype_set_in_the_configuration_is_reported_as_set(tmp_path: Path, dtype: str) -> None:
    info = Phi3MiniService(Phi3MiniConfig(dtype=dtype, runtime_dir=str(tmp_path))).get_model_info()
    assert info["engine_running"] is False and info["dtype"] == dtype
