"""The spec's load check with `ab`, against this service and vLLM's own OpenAI server, one
after the other in one run (alternating rounds), printing both requests/s and their ratio:

    ab -n 1000 -c 50 -T application/json -p payload.json http://127.0.0.1:PORT/v1/completions
    with payload.json = {"prompt": "Performance test", "max_tokens": 20}

    .venv/bin/python benchmarks/ab_compare.py [--rounds 3] [--concurrency 50]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import CAPACITY, engine_config, start_citadel, start_vllm, wait_quiet  # noqa: E402


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[50], help="one or more levels, same servers")
    parser.add_argument("--max-tokens", type=int, default=20)
    args = parser.parse_args()
    config = engine_config()
    work = Path(tempfile.mkdtemp(prefix="citadel-ab-"))
    payload = work / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": args.max_tokens}))
    servers = {"citadel": start_citadel(config, **CAPACITY), "vllm": start_vllm(config, work / "vllm.log")}
    results: dict[int, dict[str, list[dict[str, float]]]] = {c: {"citadel": [], "vllm": []} for c in args.concurrency}
    try:
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():
            run_ab(server.url, payload, 200, args.concurrency[0])  # warm-up
        for concurrency in args.concurrency:
            for rnd in range(args.rounds):
                for name in (("citadel", "vllm") if rnd % 2 == 0 else ("vllm", "citadel")):
                    wait_quiet(list(servers.values()))
                    res = run_ab(servers[name].url, payload, args.requests, concurrency)
                    results[concurrency][name].append(res)
                    print(f"c={concurrency} round {rnd + 1} {name:8s} {res['rps']:8.1f} req/s  mean {res['mean_ms']:6.1f} ms  "
                          f"p99 {res['p99_ms']:5.0f} ms  non-2xx {res['non2xx']:.0f}", flush=True)
        peak = {name: server.peak_rss_mb for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    for concurrency, by_system in results.items():
        med = {name: statistics.median(r["rps"] for r in runs) for name, runs in by_system.items()}
        mean = {name: statistics.median(r["mean_ms"] for r in runs) for name, runs in by_system.items()}
        print(f"\nab -n {args.requests} -c {concurrency}, max_tokens {args.max_tokens}, median of {args.rounds} rounds: "
              f"citadel-llm {med['citadel']:.1f} req/s (mean {mean['citadel']:.0f} ms), vLLM server "
              f"{med['vllm']:.1f} req/s (mean {mean['vllm']:.0f} ms), ratio {med['citadel'] / med['vllm']:.2f}")
    print(f"peak tree RSS: citadel-llm {peak['citadel']:.0f} MB, vLLM server {peak['vllm']:.0f} MB "
          f"({peak['citadel'] / peak['vllm']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
