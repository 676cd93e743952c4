"""Throughput of one replica against two on this host, both through nginx running the shipped
deploy/nginx/citadel-llm.conf: the same closed-loop load (benchmarks/loadgen.py) through the
same proxy, one replica behind it, then two; rounds alternate which goes first.

    python benchmarks/fleet.py --rounds 3 --requests 600 --concurrency 32 --max-tokens 20 [--pin]

--pin gives each of the two replicas one core of its own (cpu_cores 1, started with that CPU
affinity), as a host with several instances should (docs/OPERATIONS.md §8); without it both
replicas' engines bind the same cores, as any two instances do by default."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import Load, run  # noqa: E402
from service.local import ServiceProcess  # noqa: E402
from tests.nginx import Nginx  # noqa: E402

SETTINGS = {"efficiency_mode": "false", "log_level": "WARNING", "max_num_seqs": "32",
            "max_num_batched_tokens": "1024"}


def start(cpus: set[int] | None, **settings: str) -> ServiceProcess:
    allowed = os.sched_getaffinity(0)
    replica = ServiceProcess(**SETTINGS, **settings)
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)  # inherited by serve and every role it starts
        replica.start()
    finally:
        os.sched_setaffinity(0, allowed)
    return replica


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--pin", action="store_true")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    pins = ({cpus[0]}, {cpus[-1]}) if args.pin else (None, None)
    extra = {"cpu_cores": "1"} if args.pin else {}
    replicas = [start(pins[0], **extra), start(pins[1], **extra)]
    proxies: dict[str, Nginx] = {}
    try:
        for replica in replicas:
            replica.wait_healthy()
        a, b = replicas
        proxies = {"one replica": Nginx([a.port, a.port]).start(), "two replicas": Nginx([a.port, b.port]).start()}
        results: dict[str, list[dict]] = {name: [] for name in proxies}
        warm = Load(url=proxies["two replicas"].base_url, requests=200, concurrency=args.concurrency)
        asyncio.run(run(warm))
        for round_ in range(args.rounds):
            order = list(proxies) if round_ % 2 == 0 else list(reversed(proxies))
            for name in order:
                load = Load(url=proxies[name].base_url, requests=args.requests, concurrency=args.concurrency,
                            max_tokens=args.max_tokens, max_duration_s=300)
                result = asyncio.run(run(load))
                results[name].append(result)
                print(f"round {round_ + 1} {name}: {result['request_throughput']:.1f} req/s, "
                      f"p50 {result['e2e_ms'].get('p50', 0):.0f} ms, p99 {result['e2e_ms'].get('p99', 0):.0f} ms, "
                      f"failed {result['failed']}", flush=True)
        summary = {name: {"median_req_s": statistics.median(r["request_throughput"] for r in rounds),
                          "rounds_req_s": [round(r["request_throughput"], 1) for r in rounds],
                          "failed": sum(r["failed"] for r in rounds)} for name, rounds in results.items()}
        print(json.dumps({"pin": args.pin, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                          **summary}, indent=2))
    finally:
        for proxy in proxies.values():
            proxy.stop()
        for replica in replicas:
            replica.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
