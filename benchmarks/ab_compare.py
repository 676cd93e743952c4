"""The spec's load check, side by side: `ab -n 1000 -c 50` with {"prompt": "Performance test",
"max_tokens": 20} against this service and against vLLM's own OpenAI server, on the same demo
model with the same engine settings, alternating A B A B; prints medians and their ratio.

    .venv/bin/python benchmarks/ab_compare.py [--rounds 3] [--requests 1000] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.engine.settings import kv_cache_bytes  # noqa: E402
from shared.config import Phi3MiniConfig  # noqa: E402
from tests.helpers import ServiceProcess, demo_model_dir, free_port  # noqa: E402


def start_vllm(model: Path, config: Phi3MiniConfig, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "phi-3-mini", "--dtype", "float32",
            "--max-model-len", str(config.max_model_len), "--max-num-seqs", str(config.max_num_seqs),
            "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--kv-cache-memory-bytes", str(kv_cache_bytes(config, model, "float32")),
            "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats"]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server not ready")


def run_ab(url: str, payload: Path, requests: int, concurrency: int) -> dict[str, float]:
    out = subprocess.run(["ab", "-q", "-n", str(requests), "-c", str(concurrency), "-s", "60",
                          "-T", "application/json", "-p", str(payload), url + "/v1/completions"],
                         capture_output=True, text=True, timeout=600).stdout
    rps = float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    mean_ms = float(re.search(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"\s99%\s+(\d+)", out)
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    return {"rps": rps, "mean_ms": mean_ms, "p99_ms": float(p99.group(1)) if p99 else float("nan"),
            "non2xx": float(non2xx.group(1)) if non2xx else 0.0}


def tree_rss_mb(pid: int) -> float:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ab_compare.json"))
    args = parser.parse_args()

    config = Phi3MiniConfig()
    model = demo_model_dir()
    work = Path(tempfile.mkdtemp(prefix="citadel-bench-"))
    payload = work / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": args.max_tokens}))

    ours = ServiceProcess(max_num_seqs=str(config.max_num_seqs),
                          max_num_batched_tokens=str(config.max_num_batched_tokens), log_level="WARNING")
    ours.start()
    vllm_proc, vllm_url = start_vllm(model, config, work / "vllm.log")
    try:
        assert ours.proc is not None
        load = {"citadel": wait_ready(ours.base_url, ours.proc), "vllm": wait_ready(vllm_url, vllm_proc)}
        targets = {"citadel": ours.base_url, "vllm": vllm_url}
        for url in targets.values():  # warm-up
            run_ab(url, payload, 200, args.concurrency)
        results: dict[str, list[dict[str, float]]] = {"citadel": [], "vllm": []}
        for rnd in range(args.rounds):
            order = ("citadel", "vllm") if rnd % 2 == 0 else ("vllm", "citadel")
            for name in order:
                res = run_ab(targets[name], payload, args.requests, args.concurrency)
                results[name].append(res)
                print(f"round {rnd + 1} {name:8s} {res['rps']:8.1f} req/s  mean {res['mean_ms']:6.1f} ms  "
                      f"p99 {res['p99_ms']:5.0f} ms  non-2xx {res['non2xx']:.0f}", flush=True)
        rss = {"citadel": tree_rss_mb(ours.proc.pid), "vllm": tree_rss_mb(vllm_proc.pid)}
    finally:
        ours.stop()
        vllm_proc.send_signal(signal.SIGTERM)
        try:
            vllm_proc.wait(60)
        except subprocess.TimeoutExpired:
            vllm_proc.kill()

    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for name, runs in results.items()}
    ratio = med["citadel"]["rps"] / med["vllm"]["rps"]
    print()
    print(f"ab -n {args.requests} -c {args.concurrency}, max_tokens {args.max_tokens}, medians of {args.rounds} rounds")
    print(f"{'':10s}{'req/s':>10s}{'mean ms':>10s}{'p99 ms':>10s}{'tree RSS MB':>14s}{'ready s':>10s}")
    for name in ("citadel", "vllm"):
        m = med[name]
        print(f"{name:10s}{m['rps']:10.1f}{m['mean_ms']:10.1f}{m['p99_ms']:10.0f}{rss[name]:14.0f}{load[name]:10.1f}")
    print(f"ratio citadel/vllm: requests/s {ratio:.2f}, RSS {rss['citadel'] / rss['vllm']:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": results, "medians": med, "rss_mb": rss,
                               "ready_s": load, "ratio_rps": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
