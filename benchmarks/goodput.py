"""Goodput under sustained overload: the adaptive service against the same service with
steering off at each static max_num_seqs, and against vLLM's own server.

The sustainable rate is measured first (closed loop on this service, steering off, at its
ceiling of 32 sequences); every system then gets the same open-loop Poisson load at
`--overload` times that rate for `--seconds`, in alternation, `--rounds` times. Goodput is
the requests per second that finished within the end-to-end SLO; the adaptive service's
latency target is the SLO. Every request must be answered: a result, or a 429.

    .venv/bin/python benchmarks/goodput.py [--rounds 3] [--seconds 20] [--max-tokens 64] [--slo-ms 1000]

Writes benchmarks/results/goodput.json (or --out) and prints the table with the ratios.
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
from servers import ROOT, Server, engine_config, start_citadel, start_vllm, wait_quiet  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STATIC = (4, 8, 16, 32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="of open-loop arrivals per run")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slo-ms", type=float, default=1000.0)
    parser.add_argument("--target-ms", type=float, help="the adaptive service's target_latency_ms "
                        "(an average; default: the SLO)")
    parser.add_argument("--overload", type=float, default=3.0, help="times the sustainable rate")
    parser.add_argument("--static", type=int, nargs="+", default=list(STATIC),
                        help="the static max_num_seqs to compare (32 must be among them: it sets the rate)")
    parser.add_argument("--out", default="goodput.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    config = engine_config()
    work = Path(tempfile.mkdtemp(prefix="citadel-goodput-"))
    common = {"metrics_collection_interval": "1"}
    servers: dict[str, Server] = {
        "adaptive": start_citadel(config, "adaptive", efficiency_mode="true", target_latency_ms=str(args.target_ms or args.slo_ms),
                                  **common),
        **{f"static-{n}": start_citadel(config, f"static-{n}", efficiency_mode="false", max_num_seqs=str(n), **common)
           for n in args.static},
        "vllm": start_vllm(config, work / "vllm.log"),
    }
    report: dict[str, Any] = {"args": vars(args), "runs": {name: [] for name in servers}}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up
            asyncio.run(run(Load(url=server.url, requests=100, concurrency=16, max_tokens=5)))
        wait_quiet(list(servers.values()))
        capacity = asyncio.run(run(Load(url=servers["static-32"].url, requests=600, concurrency=32,
                                        max_tokens=args.max_tokens, slo_e2e_ms=args.slo_ms)))
        sustainable = capacity["request_throughput"]
        rate = args.overload * sustainable
        report["sustainable_rps"], report["offered_rps"] = sustainable, rate
        print(f"sustainable {sustainable:.1f} req/s at {args.max_tokens} tokens (closed loop, c=32); "
              f"offering {rate:.1f} req/s for {args.seconds:g} s; SLO e2e <= {args.slo_ms:g} ms", flush=True)
        names = list(servers)
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            for name in order:
                wait_quiet(list(servers.values()), timeout_s=30)
                load = Load(url=servers[name].url, requests=int(rate * args.seconds), concurrency=None, rate=rate,
                            max_tokens=args.max_tokens, slo_e2e_ms=args.slo_ms, seed=rnd, timeout_s=300)
                result = asyncio.run(run(load))
                report["runs"][name].append(result)
                print(f"  round {rnd + 1} {name:10s} goodput {result['goodput']:6.1f}/s  served "
                      f"{result['completed']:5d}  errors {result['errors_by_status']}  "
                      f"e2e p50 {result['e2e_ms']['p50']:6.0f} p95 {result['e2e_ms']['p95']:6.0f} ms  "
                      f"loadgen {result['loadgen_cpu_cores']:.2f} cores", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    table = summarize(report)
    report["median"] = table
    out = RESULTS / args.out
    out.write_text(json.dumps(report, indent=1))
    print(f"\n| system | goodput (req/s within {args.slo_ms:g} ms) | served req/s | 429 | lost | e2e p50 / p95 (ms) |")
    print("|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['goodput']:.1f} | {row['request_throughput']:.1f} | {row['refused']} | {row['lost']} | "
              f"{row['e2e_p50']:.0f} / {row['e2e_p95']:.0f} |")
    best_static = max(row["goodput"] for name, row in table.items() if name.startswith("static-"))
    adaptive = table["adaptive"]["goodput"]
    def ratio(other: float) -> str:  # no system within the SLO: no ratio
        return f"{adaptive / other:.2f}x" if other else ("n/a (both 0)" if not adaptive else "inf")

    print(f"\nadaptive / best static: {ratio(best_static)};  adaptive / vLLM: {ratio(table['vllm']['goodput'])}")
    print(f"wrote {out}")
    return 0


def summarize(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    table = {}
    for name, runs in report["runs"].items():
        def med(key: str, sub: str | None = None) -> float:
            return statistics.median(r[key][sub] if sub else r[key] for r in runs)

        errors = [r["errors_by_status"] for r in runs]
        table[name] = {
            "goodput": med("goodput"), "request_throughput": med("request_throughput"),
            "e2e_p50": med("e2e_ms", "p50"), "e2e_p95": med("e2e_ms", "p95"),
            "refused": sum(e.get("429", 0) for e in errors),
            "lost": sum(v for e in errors for k, v in e.items() if k != "429"),  # no answer, or another error
        }
    return table


if __name__ == "__main__":
    raise SystemExit(main())
