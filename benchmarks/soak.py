"""Soak: a long open-loop load at about 70 % of measured capacity, watching that the service
does not drift: resident memory, open file descriptors and the in-flight gauge stay flat, and
every request is answered. Not part of `make test` (it runs for minutes).

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--load 0.7]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Load, run  # noqa: E402
from servers import RESULTS_DIR, engine_config, start_citadel  # noqa: E402

SAMPLE_EVERY_S = 10.0


def tree_fds(pid: int) -> int:
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.num_fds()
        except psutil.Error:
            pass
    return total


def in_flight(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("phi3_mini_requests_in_flight "):
                return float(line.split()[1])
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--load", type=float, default=0.7, help="fraction of the measured capacity")
    parser.add_argument("--max-tokens", type=int, default=20)
    args = parser.parse_args()
    server = start_citadel(engine_config())
    server.wait_ready()
    metrics_url = server.metrics_url
    samples: list[dict[str, float]] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        while not stop.wait(SAMPLE_EVERY_S):
            try:
                flight = in_flight(metrics_url)
            except OSError:
                flight = float("nan")
            samples.append({"t_s": round(time.monotonic() - started, 1), "rss_mb": round(server.tree_rss_mb(), 1),
                            "fds": tree_fds(server.proc.pid), "in_flight": flight})
            print(samples[-1], flush=True)

    try:
        capacity = asyncio.run(run(Load(url=server.url, requests=2000, concurrency=50,
                                        max_tokens=args.max_tokens)))["request_throughput"]
        rate = capacity * args.load
        duration_s = args.minutes * 60
        print(f"capacity {capacity:.1f} req/s; soaking at {rate:.1f} req/s for {duration_s:.0f} s", flush=True)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        result = asyncio.run(run(Load(url=server.url, requests=int(rate * duration_s) + 1, concurrency=None, rate=rate,
                                      max_tokens=args.max_tokens, max_duration_s=duration_s + 5)))
        stop.set()
        thread.join(30)
        time.sleep(2)
        idle_in_flight = in_flight(metrics_url)
    finally:
        stop.set()
        server.stop()
    first, last = samples[0], samples[-1]
    summary = {
        "capacity_rps": capacity, "rate_rps": rate, "completed": result["completed"], "failed": result["failed"],
        "errors_by_status": result["errors_by_status"], "e2e_ms": result["e2e_ms"],
        "rss_mb_first_last_max": [first["rss_mb"], last["rss_mb"], max(s["rss_mb"] for s in samples)],
        "fds_first_last_max": [first["fds"], last["fds"], max(s["fds"] for s in samples)],
        "in_flight_max": max(s["in_flight"] for s in samples), "in_flight_after": idle_in_flight,
        "samples": samples,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "soak.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
