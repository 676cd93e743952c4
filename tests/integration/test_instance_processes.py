"""An instance measures its own processes only: found from its own serve's tree, never by
scanning the host for `citadel-llm` titles (two instances on one host reported each other's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, wait_for

pytestmark = pytest.mark.integration


def test_an_orchestrator_on_its_own_does_not_count_another_instances_processes() -> None:
    # another instance's engine, as the host shows it: a process titled "citadel-llm engine"
    decoy = subprocess.Popen(["bash", "-c", 'exec -a "citadel-llm engine" sleep 60'])
    runtime = Path(tempfile.mkdtemp(prefix="citadel-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    env.update(PHI_3_MINI_RUNTIME_DIR=str(runtime), PHI_3_MINI_METRICS_COLLECTION_INTERVAL="0.5")
    orchestrator = subprocess.Popen([sys.executable, "-m", "service", "orchestrator"], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        report = runtime / "efficiency.json"
        wait_for(report.exists, 30, "the orchestrator's first report")
        time.sleep(1.0)  # a second sample, past the first write
        pids = {proc["pid"] for proc in json.loads(report.read_text())["processes"]}
        assert decoy.pid not in pids
        assert pids == {orchestrator.pid}  # not under serve: itself alone
    finally:
        for proc in (orchestrator, decoy):
            proc.terminate()
            proc.wait(10)
