"""The engine's OpenMP threads: this service with `engine_threads` 1 against every core, on one
model, one after the other in one run, `--rounds` of each figure (issue 18's threads rule):

- c=1: mean latency of one 20-token request at a time;
- the spec's load with `ab` at c=50 (`{"prompt": "Performance test", "max_tokens": 20}`);
- output tokens per CPU-second of the whole tree at c=50.

    .venv/bin/python benchmarks/engine_threads.py --model models/demo [--rounds 3]

Prints the medians and the ratio (every core / one thread); writes
benchmarks/results/engine_threads-<model>.json. The rule `engine_threads: 0` applies
(service/engine/settings.py, `auto_engine_threads`) was read from these runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ab_compare import run_ab  # noqa: E402
from loadgen import Load, run  # noqa: E402
from servers import CAPACITY, Server, engine_config, start_citadel, wait_quiet, write_result  # noqa: E402


def _tokens_per_cpu_s(server: Server, load: Load) -> float:
    before = server.tree_cpu_s()
    result = asyncio.run(run(load))
    return result["output_token_throughput"] * result["duration_s"] / (server.tree_cpu_s() - before)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per c=50 load")
    args = parser.parse_args()
    os.environ["CITADEL_BENCH_MODEL"] = args.model
    cores = len(os.sched_getaffinity(0))
    config = engine_config()
    payload = Path(tempfile.mkdtemp(prefix="citadel-threads-")) / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": 20}))
    measures = {
        "c=1 mean ms": lambda s: asyncio.run(run(Load(url=s.url, requests=20, concurrency=1,
                                                      max_tokens=20)))["e2e_ms"]["mean"],
        "ab -c 50 req/s": lambda s: run_ab(s.url, payload, args.requests, 50)["rps"],
        "tokens/CPU-s c=50": lambda s: _tokens_per_cpu_s(s, Load(url=s.url, requests=args.requests,
                                                                 concurrency=50, max_tokens=20)),
    }
    report: dict[str, Any] = {"model": args.model, "cores": cores, "args": vars(args), "runs": {}, "median": {},
                              "peak_rss_mb": {}}
    names = [f"threads={n}" for n in (1, cores)]
    for name, threads in zip(names, (1, cores)):
        # One service at a time: an idle second service still probes its engine now and then
        # (a forward pass on a shared core); with both running, the 2-thread c=1 figure of
        # SmolLM2 swung from 850 to 3,000 ms between rounds.
        server = start_citadel(config, name, engine_threads=str(threads), **CAPACITY)
        try:
            server.wait_ready(timeout_s=1200)
            asyncio.run(run(Load(url=server.url, requests=100, concurrency=50, max_tokens=5)))  # warm-up
            for figure, measure in measures.items():
                for _ in range(args.rounds):
                    wait_quiet([server], timeout_s=30)
                    report["runs"].setdefault(figure, {}).setdefault(name, []).append(measure(server))
            report["peak_rss_mb"][name] = server.peak_rss_mb
        finally:
            server.stop()
    for figure, runs in report["runs"].items():
        med = report["median"][figure] = {name: statistics.median(values) for name, values in runs.items()}
        one, every = med[names[0]], med[names[1]]
        print(f"{figure:20s} {names[0]} {one:8.1f}   {names[1]} {every:8.1f}   ratio {every / one:.2f}   "
              f"(rounds: {[round(v, 1) for v in runs[names[0]]]} / {[round(v, 1) for v in runs[names[1]]]})", flush=True)
    write_result(f"engine_threads-{Path(args.model).name}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
