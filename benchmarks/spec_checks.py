"""The spec's validation commands, verbatim, against the shipped configuration.

By default it starts `citadel-llm serve` exactly as `make serve` does: the shipped
deploy/config/phi-3-mini.yaml, no PHI_3_MINI_* override but the demo model's folder, ports
11403 and 11404. With --url it checks a service already running (`make serve` in another
terminal). Each command runs as the spec writes it (curl, ab, python -c) and prints one
PASS/FAIL line; the exit status is 1 if any line failed.

    .venv/bin/python benchmarks/spec_checks.py [--url http://127.0.0.1:11403]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
URL, METRICS_URL = "http://127.0.0.1:11403", "http://127.0.0.1:11404"
TARGET_MS = 500.0
COMPLETION = 'curl -s -o /dev/null -w "%{{http_code}} %{{time_total}}" -X POST {url}/v1/completions ' \
             "-H 'Content-Type: application/json' -d '{body}'"


class Result:
    def __init__(self, command: str, ok: bool, shown: str) -> None:
        self.command, self.ok, self.shown = command, ok, shown


ENV = dict(os.environ)  # the commands' environment: `make serve`'s when this script starts the service


def sh(command: str, timeout_s: float = 600) -> tuple[int, str]:
    run = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=timeout_s,
                         cwd=ROOT, env=ENV)
    return run.returncode, run.stdout + run.stderr


def status_of(url: str) -> Result:
    command = f'curl -s -o /dev/null -w "%{{http_code}}" {url}'
    _, out = sh(command)
    return Result(command, out.strip() == "200", f"HTTP {out.strip()}")


def quick_test(url: str) -> Result:
    command = COMPLETION.format(url=url, body='{"prompt": "Hello, how are you?", "max_tokens": 50}')
    _, out = sh(command)
    code, seconds = out.split()
    ms = float(seconds) * 1000
    return Result(command, code == "200" and ms < TARGET_MS, f"HTTP {code} in {ms:.0f} ms (target < {TARGET_MS:g})")


def sequential(url: str) -> Result:
    one = COMPLETION.format(url=url, body='{"prompt": "Performance test", "max_tokens": 20}')
    command = f"for i in $(seq 1 50); do {one}; echo; done"
    _, out = sh(command)
    answers = [line.split() for line in out.splitlines() if line.strip()]
    codes = {code for code, _ in answers}
    avg_ms = sum(float(s) for _, s in answers) / max(len(answers), 1) * 1000
    ok = len(answers) == 50 and codes == {"200"} and avg_ms < TARGET_MS
    return Result("50 x " + one, ok, f"{len(answers)} answers {sorted(codes)}, average {avg_ms:.0f} ms "
                                     f"(target < {TARGET_MS:g})")


def ab(url: str, concurrency: int, payload: Path) -> Result:
    command = (f"ab -n 1000 -c {concurrency} -T application/json -p {payload} {url}/v1/completions")
    _, out = sh(command)

    def field(name: str) -> float:
        found = re.search(rf"{name}:\s+([\d.]+)", out)
        return float(found.group(1)) if found else 0.0

    non2xx = int(field("Non-2xx responses"))
    complete = int(field("Complete requests"))
    taken = field("Time taken for tests")
    rps_200 = (complete - non2xx) / taken if taken else 0.0  # ab's own figure would count refusals too
    ok = complete == 1000 and non2xx == 0 and rps_200 > 100
    return Result(command, ok, f"{complete} complete, {non2xx} non-2xx, {rps_200:.1f} requests/s answered 200 "
                               f"(target > 100), mean {field('Time per request'):.0f} ms")


def metrics_port() -> Result:
    command = f"curl -s {METRICS_URL}/metrics | grep phi"
    code, out = sh(command)
    families = {line.split()[2] for line in out.splitlines() if line.startswith("# TYPE")}
    return Result(command, code == 0 and len(families) > 10, f"{len(families)} phi3_mini_ families")


def model_info() -> Result:
    command = (f'{PY} -c "from service import Phi3MiniService; from shared.config import load_config; '
               'print(Phi3MiniService(load_config()).get_model_info())"')
    code, out = sh(command, timeout_s=60)
    ok = code == 0 and "'engine_running': True" in out
    load = re.search(r"'load_seconds': ([\d.]+)", out)
    load_s = float(load.group(1)) if load else float("nan")
    return Result(command, ok and load_s < 30, f"engine_running, model load {load_s:.1f} s (target < 30)"
                  if ok else out.strip().splitlines()[-1][:200])


def optimization_status() -> Result:
    command = (f'{PY} -c "from orchestrator.policy import EfficiencyManager; '
               'print(EfficiencyManager().get_optimization_status())"')
    code, out = sh(command, timeout_s=60)
    return Result(command, code == 0 and "'efficiency_mode': True" in out, out.strip()[:120])


def tree_rss_gb(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0
    for proc in (root, *root.children(recursive=True)):
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**30


def make_serve_env() -> dict[str, str]:
    """`make serve`'s environment: the shipped YAML, nothing overridden but the demo model's folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHI_3_MINI_")}
    env["PHI_3_MINI_DEMO_MODEL_DIR"] = str(ROOT / "models" / "demo")
    return env


def wait_healthy(proc: subprocess.Popen[bytes], timeout_s: float = 600) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"citadel-llm serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(URL + "/health", timeout=2):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.25)
    raise SystemExit("citadel-llm serve did not become healthy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running service (e.g. `make serve`); default: start one as `make serve` does")
    args = parser.parse_args()
    proc = None
    url = args.url or URL
    if args.url is None:
        ENV.clear()
        ENV.update(make_serve_env())
        proc = subprocess.Popen([str(ROOT / ".venv" / "bin" / "citadel-llm"), "serve"], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        print(f"started citadel-llm serve (the shipped configuration); healthy after {wait_healthy(proc):.1f} s")
    payload = Path(tempfile.mkdtemp()) / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": 20}))
    checks: list[Callable[[], Result]] = [
        lambda: status_of(f"{url}/health"),
        lambda: status_of(f"{url}/efficiency"),
        lambda: status_of(f"{url}/metrics/efficiency"),
        metrics_port,
        lambda: quick_test(url),
        lambda: sequential(url),
        lambda: ab(url, 50, payload),
        lambda: ab(url, 100, payload),
        model_info,
        optimization_status,
    ]
    results: list[Result] = []
    try:
        for check in checks:
            results.append(check())
            r = results[-1]
            print(f"{'PASS' if r.ok else 'FAIL'}  {r.command}\n      -> {r.shown}", flush=True)
        if proc is not None:
            rss = tree_rss_gb(proc.pid)
            results.append(Result("RSS of the whole process tree", rss < 4.0, f"{rss:.2f} GB (target < 4)"))
            print(f"{'PASS' if results[-1].ok else 'FAIL'}  {results[-1].command}\n      -> {results[-1].shown}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(90)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
