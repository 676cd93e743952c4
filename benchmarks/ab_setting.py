"""One setting of this service, two values, on one model: one service after the other in one
run, `--rounds` of each figure:

- c=1: mean latency of one 20-token request at a time;
- the spec's load with `ab` at c=50 (`{"prompt": "Performance test", "max_tokens": 20}`);
- output tokens per CPU-second of the whole tree at c=50;
- the whole tree's peak RSS.

    .venv/bin/python benchmarks/ab_setting.py --model models/smollm2-135m-instruct \\
        --setting engine_core --values process,thread [--rounds 3]

Prints the medians and the ratio (second value / first); writes
benchmarks/results/<setting>-<model>.json.
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


def compare(model: str, setting: str, values: list[str], rounds: int = 3, requests: int = 300) -> dict[str, Any]:
    os.environ["CITADEL_BENCH_MODEL"] = model
    config = engine_config()
    payload = Path(tempfile.mkdtemp(prefix="citadel-ab-")) / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": 20}))
    measures = {
        "c=1 mean ms": lambda s: asyncio.run(run(Load(url=s.url, requests=20, concurrency=1,
                                                      max_tokens=20)))["e2e_ms"]["mean"],
        "ab -c 50 req/s": lambda s: run_ab(s.url, payload, requests, 50)["rps"],
        "tokens/CPU-s c=50": lambda s: _tokens_per_cpu_s(s, Load(url=s.url, requests=requests,
                                                                 concurrency=50, max_tokens=20)),
    }
    report: dict[str, Any] = {"model": model, "cores": len(os.sched_getaffinity(0)), "setting": setting,
                              "rounds": rounds, "requests": requests, "runs": {}, "median": {}}
    names = [f"{setting}={value}" for value in values]
    for name, value in zip(names, values):
        # One service at a time: an idle second service still probes its engine now and then
        # (a forward pass on a shared core); with both running, the 2-thread c=1 figure of
        # SmolLM2 swung from 850 to 3,000 ms between rounds.
        server = start_citadel(config, name, **{setting: value, **CAPACITY})
        try:
            server.wait_ready(timeout_s=1200)
            asyncio.run(run(Load(url=server.url, requests=100, concurrency=50, max_tokens=5)))  # warm-up
            for figure, measure in measures.items():
                for _ in range(rounds):
                    wait_quiet([server], timeout_s=30)
                    report["runs"].setdefault(figure, {}).setdefault(name, []).append(measure(server))
            report["runs"].setdefault("peak tree RSS MB", {})[name] = [server.peak_rss_mb]
        finally:
            server.stop()
    for figure, runs in report["runs"].items():
        med = report["median"][figure] = {name: statistics.median(values) for name, values in runs.items()}
        first, second = med[names[0]], med[names[1]]
        print(f"{figure:20s} {names[0]} {first:8.1f}   {names[1]} {second:8.1f}   ratio {second / first:.2f}   "
              f"(rounds: {[round(v, 1) for v in runs[names[0]]]} / {[round(v, 1) for v in runs[names[1]]]})", flush=True)
    write_result(f"{setting}-{Path(model).name}.json", report)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder")
    parser.add_argument("--setting", required=True, help="a setting's name (engine_core, engine_threads, ...)")
    parser.add_argument("--values", required=True, help="two values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=300, help="per c=50 load")
    args = parser.parse_args()
    values = args.values.split(",")
    if len(values) != 2:
        parser.error("--values takes two values")
    compare(args.model, args.setting, values, args.rounds, args.requests)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
