"""install.sh reads the configuration through `citadel-llm config show --format json`, in the
environment the unit gives the service: the instance's env file overrides the YAML, the
caller's own environment does not reach it, and a value the service would refuse stops it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
ENV_FILE = "etc/citadel-llm/phi-3-mini.env"
SLICE = "etc/systemd/system/citadel-llm.slice"


def install(prefix: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(INSTALL), "--prefix", str(prefix), "--skip-venv"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def test_the_env_file_overrides_the_yaml(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    assert "MemoryMax=4096M" in (tmp_path / SLICE).read_text()
    with (tmp_path / ENV_FILE).open("a") as f:
        f.write('# an operator\'s overrides\nPHI_3_MINI_MEMORY_GB=6\n  PHI_3_MINI_CPU_CORES="3"\nOTHER=1\n')
    result = install(tmp_path)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / SLICE).read_text()
    assert "MemoryMax=6144M" in text and "MemoryHigh=5529M" in text and "CPUQuota=300%" in text
    assert "memory_gb 6, cpu_cores 3" in text
    assert "MemoryMax=6144M CPUQuota=300%" in result.stdout


def test_the_callers_environment_is_not_the_units(tmp_path: Path) -> None:
    result = install(tmp_path, {"PHI_3_MINI_MEMORY_GB": "8", "PHI_3_MINI_NOT_A_SETTING": "1"})
    assert result.returncode == 0, result.stderr
    assert "MemoryMax=4096M" in (tmp_path / SLICE).read_text()


def test_a_value_the_service_refuses_stops_the_install(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    before = (tmp_path / SLICE).read_text()
    with (tmp_path / ENV_FILE).open("a") as f:
        f.write("PHI_3_MINI_MEMORY_GB=-1\n")
    result = install(tmp_path)
    assert result.returncode == 1
    assert "memory_gb" in result.stderr and "the configuration does not load" in result.stderr
    assert (tmp_path / SLICE).read_text() == before  # the slice of the last good configuration stays
