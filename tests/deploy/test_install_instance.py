"""install.sh --instance NAME --port PORT: a second instance on the same host, with its own
config, env file and ports (metrics on PORT+1), refused when its ports are another instance's;
the shared slice caps them all (the sum of their memory_gb and cpu_cores)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "deploy" / "install.sh"
SLICE = "etc/systemd/system/citadel-llm.slice"


def install(prefix: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    return subprocess.run(["bash", str(INSTALL), "--prefix", str(prefix), "--skip-venv", *extra],
                          capture_output=True, text=True, timeout=180, env=env)


def config_show(prefix: Path, name: str) -> dict:
    """What the unit citadel-llm@NAME would run with: its YAML, then its env file."""
    env = {"PATH": os.environ["PATH"], "PHI_3_MINI_CONFIG": str(prefix / f"opt/citadel/config/services/{name}.yaml")}
    for line in (prefix / f"etc/citadel-llm/{name}.env").read_text().splitlines():
        if line.startswith("PHI_3_MINI_"):
            key, _, value = line.partition("=")
            env[key] = value
    result = subprocess.run([str(ROOT / ".venv" / "bin" / "citadel-llm"), "config", "show", "--format", "json"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_second_instance_gets_its_own_files_and_ports(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    result = install(tmp_path, "--instance", "phi-3-mini-b", "--port", "11413")
    assert result.returncode == 0, result.stderr
    env_file = (tmp_path / "etc/citadel-llm/phi-3-mini-b.env").read_text()
    assert "PHI_3_MINI_PORT=11413\nPHI_3_MINI_METRICS_PORT=11414\n" in env_file
    assert "citadel-llm@phi-3-mini-b" in env_file and "citadel-llm@phi-3-mini " not in env_file
    assert (tmp_path / "opt/citadel/config/services/phi-3-mini-b.yaml").exists()
    shown = config_show(tmp_path, "phi-3-mini-b")
    assert (shown["service"]["port"], shown["monitoring"]["metrics_port"]) == (11413, 11414)
    assert config_show(tmp_path, "phi-3-mini")["service"]["port"] == 11403  # the first is untouched
    # one template unit serves both: citadel-llm@phi-3-mini and citadel-llm@phi-3-mini-b
    assert [p.name for p in (tmp_path / "etc/systemd/system").glob("citadel-llm@*")] == ["citadel-llm@.service"]
    # the shared slice caps both instances together
    text = (tmp_path / SLICE).read_text()
    assert "MemoryMax=8192M" in text and "CPUQuota=400%" in text
    assert "citadel-llm@phi-3-mini-b" in result.stdout


def test_an_instance_on_another_instances_ports_is_refused(tmp_path: Path) -> None:
    assert install(tmp_path).returncode == 0
    before = (tmp_path / SLICE).read_text()
    result = install(tmp_path, "--instance", "phi-3-mini-b")
    assert result.returncode == 1
    assert "instance phi-3-mini already uses port 11403" in result.stderr and "--port" in result.stderr
    # nothing of the refused instance stays behind: the same command with --port then works
    assert not (tmp_path / "etc/citadel-llm/phi-3-mini-b.env").exists()
    assert not (tmp_path / "opt/citadel/config/services/phi-3-mini-b.yaml").exists()
    assert (tmp_path / SLICE).read_text() == before
    assert install(tmp_path, "--instance", "phi-3-mini-b", "--port", "11404").returncode == 1  # the metrics port
    assert install(tmp_path, "--instance", "phi-3-mini-b", "--port", "11423").returncode == 0


def test_reinstalling_keeps_an_instances_env_file(tmp_path: Path) -> None:
    assert install(tmp_path, "--instance", "b", "--port", "12000").returncode == 0
    result = install(tmp_path, "--instance", "b", "--port", "13000")
    assert result.returncode == 0, result.stderr
    assert "--port applies to a new instance" in result.stdout
    assert "PHI_3_MINI_PORT=12000" in (tmp_path / "etc/citadel-llm/b.env").read_text()


def test_bad_names_and_ports_are_refused(tmp_path: Path) -> None:
    assert install(tmp_path, "--instance", "../etc").returncode == 2
    assert install(tmp_path, "--instance", "b", "--port", "65535").returncode == 2
    assert not (tmp_path / "etc").exists()
