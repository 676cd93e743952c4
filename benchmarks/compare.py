"""`make bench`: this service against vLLM's own OpenAI server, side by side in one run.

Both serve the same demo model with the same engine settings; every load runs against each
in alternation (A B, then B A, …) and the report gives per metric the median of the rounds
and the ratio citadel/vLLM. Results go to benchmarks/results/compare.json and a chart
benchmarks/results/sweep.png (throughput and p95 latency against concurrency).

    .venv/bin/python benchmarks/compare.py [--rounds 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loadgen import Load, run  # noqa: E402
from servers import CAPACITY, ROOT, Server, engine_config, start_citadel, start_vllm, wait_quiet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SWEEP = (1, 2, 4, 8, 16, 32, 64, 128)


def loads(quick: bool) -> dict[str, dict[str, Any]]:
    scale = 0.3 if quick else 1.0
    n = lambda k: max(50, int(k * scale))  # noqa: E731
    named = {
        "spec c=50, 20 tokens": dict(concurrency=50, requests=n(1000), max_tokens=20),
        "spec c=100, 50 tokens": dict(concurrency=100, requests=n(1000), max_tokens=50),
        "API-bound c=50, 1 token": dict(concurrency=50, requests=n(2000), max_tokens=1),
        "stream c=32, 50 tokens": dict(concurrency=32, requests=n(320), max_tokens=50, stream=True),
    }
    for c in SWEEP:
        named[f"sweep c={c}"] = dict(concurrency=c, requests=n(max(60, c * 10)), max_tokens=20)
    return named


METRICS = (("request_throughput", "req/s", True), ("output_token_throughput", "tok/s", True),
           ("goodput", "goodput req/s", True), ("e2e_ms.p50", "e2e p50 ms", False),
           ("e2e_ms.p99", "e2e p99 ms", False), ("ttft_ms.p50", "TTFT p50 ms", False),
           ("itl_ms.p50", "ITL p50 ms", False), ("e2e_ms.p95", "e2e p95 ms", False))


def metric(result: dict[str, Any], path: str) -> float:
    value: Any = result
    for part in path.split("."):
        value = value[part]
    return float(value)


def median_of(results: list[dict[str, Any]], path: str) -> float:
    return statistics.median(metric(r, path) for r in results)


def chart(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, style in (("citadel", "o-"), ("vllm", "s--")):
        xs = list(SWEEP)
        rps = [report["loads"][f"sweep c={c}"]["median"][system]["request_throughput"] for c in SWEEP]
        p95 = [report["loads"][f"sweep c={c}"]["median"][system]["e2e_ms.p95"] for c in SWEEP]
        label = "citadel-llm" if system == "citadel" else "vLLM OpenAI server"
        ax1.plot(xs, rps, style, label=label)
        ax2.plot(xs, p95, style, label=label)
    for ax, title, unit in ((ax1, "Throughput", "requests/s"), (ax2, "p95 end-to-end latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop, 20 tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax2.axhline(500, color="grey", linewidth=0.8, linestyle=":")
    fig.suptitle("Phi-3 demo model on 2 CPU cores, same engine settings")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer requests per load")
    parser.add_argument("--only", default="", help="run only loads whose name contains this")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = engine_config()
    work = Path(tempfile.mkdtemp(prefix="citadel-bench-"))
    servers: dict[str, Server] = {"citadel": start_citadel(config, **CAPACITY), "vllm": start_vllm(config, work / "vllm.log")}
    report: dict[str, Any] = {"rounds": args.rounds, "loads": {}}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up
            asyncio.run(run(Load(url=server.url, requests=200, concurrency=50, max_tokens=5)))
        for name, params in loads(args.quick).items():
            if args.only and args.only not in name:
                continue
            runs: dict[str, list[dict[str, Any]]] = {"citadel": [], "vllm": []}
            for rnd in range(args.rounds):
                order = ("citadel", "vllm") if rnd % 2 == 0 else ("vllm", "citadel")
                for system in order:
                    waited = wait_quiet(list(servers.values()))
                    result = asyncio.run(run(Load(url=servers[system].url, **params)))
                    result["quiet_wait_s"] = waited
                    runs[system].append(result)
            med = {system: {path: median_of(rs, path) for path, _, _ in METRICS} | {
                "loadgen_cpu_cores": max(r["loadgen_cpu_cores"] for r in rs),
                "failed": sum(r["failed"] for r in rs)} for system, rs in runs.items()}
            report["loads"][name] = {"params": params, "runs": runs, "median": med}
            c, v = med["citadel"], med["vllm"]
            print(f"{name:26s} req/s {c['request_throughput']:7.1f} vs {v['request_throughput']:7.1f} "
                  f"({c['request_throughput'] / v['request_throughput']:.2f}x)  p99 {c['e2e_ms.p99']:6.0f} vs "
                  f"{v['e2e_ms.p99']:6.0f} ms  ITL p50 {c['itl_ms.p50']:5.1f} vs {v['itl_ms.p50']:5.1f} ms  "
                  f"loadgen {max(c['loadgen_cpu_cores'], v['loadgen_cpu_cores']):.2f} cores  "
                  f"failed {c['failed']}/{v['failed']}", flush=True)
        report["peak_rss_mb"] = {name: s.peak_rss_mb for name, s in servers.items()}
        report["ready_s"] = {name: s.ready_s for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    print(f"peak tree RSS: citadel {report['peak_rss_mb']['citadel']:.0f} MB, vLLM {report['peak_rss_mb']['vllm']:.0f} MB "
          f"({report['peak_rss_mb']['citadel'] / report['peak_rss_mb']['vllm']:.2f}x)")
    out = RESULTS / "compare.json"
    out.write_text(json.dumps(report, indent=1))
    if all(f"sweep c={c}" in report["loads"] for c in SWEEP):
        chart(report, RESULTS / "sweep.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
