"""Deployment: install.sh into a temporary root, the units checked by systemd's own tools."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
UNITS = ["citadel-llm@phi-3-mini.service", "citadel-llm.slice"]
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze missing; `make test` installs Debian's systemd")


def install(prefix: Path, *extra: str) -> str:
    result = subprocess.run(["bash", str(INSTALL), "--prefix", str(prefix), "--skip-venv", *extra],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def tree(prefix: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(prefix)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                         p.stat().st_mode)
            for p in sorted(prefix.rglob("*"))}


def test_install_twice_gives_the_same_result(tmp_path: Path) -> None:
    install(tmp_path)
    first = tree(tmp_path)
    install(tmp_path)
    assert tree(tmp_path) == first
    for rel in ("etc/systemd/system/citadel-llm@.service", "etc/systemd/system/citadel-llm.slice", "opt/citadel/config/services/phi-3-mini.yaml",
                "etc/citadel-llm/phi-3-mini.env", "opt/models", "opt/citadel/docs/OPERATIONS.md"):
        assert rel in first, rel


def test_install_keeps_the_operators_config(tmp_path: Path) -> None:
    install(tmp_path)
    config = tmp_path / "opt/citadel/config/services/phi-3-mini.yaml"
    config.write_text(config.read_text().replace("memory_gb: 4", "memory_gb: 6").replace("cpu_cores: 2", "cpu_cores: 3"))
    install(tmp_path)
    assert "memory_gb: 6" in config.read_text()
    slice_text = (tmp_path / "etc/systemd/system/citadel-llm.slice").read_text()
    assert "MemoryMax=6144M" in slice_text and "CPUQuota=300%" in slice_text
    assert "MemoryHigh=5529M" in slice_text


def test_slice_caps_from_the_default_config(tmp_path: Path) -> None:
    install(tmp_path)
    text = (tmp_path / "etc/systemd/system/citadel-llm.slice").read_text()
    assert "MemoryMax=4096M" in text and "CPUQuota=200%" in text


def test_gpu_install_adds_the_device_drop_in(tmp_path: Path) -> None:
    install(tmp_path, "--gpu")
    dropin = tmp_path / "etc/systemd/system/citadel-llm@.service.d/gpu.conf"
    assert "DeviceAllow=/dev/nvidiactl rw" in dropin.read_text()


def test_install_removes_the_per_role_units_of_an_older_install(tmp_path: Path) -> None:
    unit_dir = tmp_path / "etc/systemd/system"
    (unit_dir / "citadel-llm-engine@.service.d").mkdir(parents=True)
    (unit_dir / "citadel-llm-engine@.service.d/gpu.conf").write_text("[Service]\n")
    for role in ("engine", "gateway", "orchestrator"):
        (unit_dir / f"citadel-llm-{role}@.service").write_text("[Service]\n")
    out = install(tmp_path)
    assert sorted(p.name for p in unit_dir.iterdir()) == ["citadel-llm.slice", "citadel-llm@.service"]
    assert "removed" in out


def _units_for_analysis(tmp_path: Path) -> Path:
    """The installed units with ExecStart pointing at this checkout's real executable
    (systemd-analyze checks that it exists)."""
    install(tmp_path)
    unit_dir = tmp_path / "etc/systemd/system"
    exe = Path(sys.executable).parent / "citadel-llm"
    assert exe.exists()
    for unit in unit_dir.glob("*.service"):
        unit.write_text(unit.read_text().replace("/opt/citadel/venv/bin/citadel-llm", str(exe)))
    return unit_dir


@needs_systemd
def test_systemd_analyze_verify_passes_on_every_unit(tmp_path: Path) -> None:
    unit_dir = _units_for_analysis(tmp_path)
    result = subprocess.run(["systemd-analyze", "verify", *UNITS], cwd=unit_dir, capture_output=True, text=True,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""  # no warnings either


@needs_systemd
def test_security_exposure(tmp_path: Path) -> None:
    unit_dir = _units_for_analysis(tmp_path)
    unit = "citadel-llm@phi-3-mini.service"
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", unit], cwd=unit_dir,
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"})
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"systemd-analyze security {unit}: exposure {exposure}")
    # the union of the three roles' needs: the gateway's TCP and the engine's torch and vLLM
    assert exposure <= 2.0


def test_the_unit_runs_the_whole_service() -> None:
    from service.supervisor import stop_budget_s
    from shared.config import Phi3MiniConfig

    text = (ROOT / "deploy" / "systemd" / "citadel-llm@.service").read_text()
    assert "ExecStart=/opt/citadel/venv/bin/citadel-llm serve" in text
    assert "Type=notify" in text and "NotifyAccess=main" in text
    assert "Slice=citadel-llm.slice" in text
    assert "CPUAccounting=yes" in text and "MemoryAccounting=yes" in text
    assert "Restart=on-failure" in text and "StartLimitBurst=" in text
    assert "WatchdogSec=" in text
    assert "KillMode=mixed" in text  # SIGTERM to serve alone: it stops its children in order
    assert "EnvironmentFile=-/etc/citadel-llm/%i.env" in text
    assert "PHI_3_MINI_CONFIG=/opt/citadel/config/services/%i.yaml" in text
    assert "RuntimeDirectory=citadel-llm/%i" in text
    assert "User=citadel" in text and "ProtectSystem=strict" in text
    # torch and vLLM: executable memory for their kernels, a writable temporary directory
    assert not re.search(r"^MemoryDenyWriteExecute=yes", text, re.M) and "PrivateTmp=yes" in text
    # serve's own stop, every child at its deadline and then killed, fits before systemd's SIGKILL
    stop_s = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))  # type: ignore[union-attr]
    longest = msgspec.inspect.type_info(Phi3MiniConfig).fields  # the largest stop_timeout_s the config accepts
    graceful = next(f.type.le for f in longest if f.name == "stop_timeout_s")
    assert graceful and stop_s > stop_budget_s(graceful)
