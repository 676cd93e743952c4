"""Render benchmarks/results/compare.json as the Markdown tables of BENCHMARKS.md.

    .venv/bin/python benchmarks/report.py > /tmp/tables.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (("request_throughput", "req/s", "{:.1f}"), ("e2e_ms.p50", "e2e p50 ms", "{:.0f}"),
           ("e2e_ms.p95", "e2e p95 ms", "{:.0f}"), ("e2e_ms.p99", "e2e p99 ms", "{:.0f}"),
           ("ttft_ms.p50", "TTFT p50 ms", "{:.0f}"), ("itl_ms.p50", "ITL p50 ms", "{:.1f}"),
           ("goodput", "goodput req/s (e2e ≤ 500 ms)", "{:.1f}"))


def main() -> int:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "compare.json"
    report = json.loads(path.read_text())
    print(f"Medians of {report['rounds']} alternating rounds per load; ratio = citadel-llm / vLLM.\n")
    print("| load | system | " + " | ".join(title for _, title, _ in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for name, entry in report["loads"].items():
        med = entry["median"]
        for system, label in (("citadel", "citadel-llm"), ("vllm", "vLLM server")):
            cells = []
            for key, _, fmt in COLUMNS:
                value = med[system][key]
                cells.append("–" if value != value else fmt.format(value))  # NaN: not measured
            print(f"| {name if system == 'citadel' else ''} | {label} | " + " | ".join(cells) + " |")
        c, v = med["citadel"], med["vllm"]
        ratios = []
        for key, _, _ in COLUMNS:
            a, b = c[key], v[key]
            ratios.append("–" if a != a or b != b or not b else f"{a / b:.2f}×")
        print("|  | **ratio** | " + " | ".join(ratios) + " |")
    rss = report.get("peak_rss_mb", {})
    if rss:
        print(f"\nPeak RSS of the whole process tree: citadel-llm {rss['citadel']:.0f} MB, "
              f"vLLM server {rss['vllm']:.0f} MB ({rss['citadel'] / rss['vllm']:.2f}×).")
    cores = max(r["loadgen_cpu_cores"] for e in report["loads"].values() for rs in e["runs"].values() for r in rs)
    print(f"The load generator itself used at most {cores:.2f} of a core in any run.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
