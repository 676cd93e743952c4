"""The real instruct model (`make real-model`: SmolLM2-135M-Instruct, 30 layers) served by this
service and by vLLM's own OpenAI server, side by side in one run, same dtype (the one this
service's model card says it serves: float32 as ServiceProcess pins it, or PHI_3_MINI_DTYPE) and the
same KV cache (vLLM is given exactly the bytes this service's engine made of memory_gb):

- greedy text: the same chat and completion prompts on both, answers compared character by character;
- c=1 latency: one request at a time, 20 tokens;
- the spec's load with `ab` (`{"prompt": "Performance test", "max_tokens": 20}`) at c=50 and c=100;
- streaming at c=16 (32-token prompts, 64-token answers): TTFT and inter-token latency;
- tokens per CPU-second of the whole process tree, under closed-loop load at c=50 (`ignore_eos`);
- the whole tree's peak RSS over the run.

Loads alternate between the systems (A B, then B A), each after both trees are idle; the table
gives the median of `--rounds` per figure and the ratio citadel/vLLM.

    .venv/bin/python benchmarks/real_model.py [--rounds 3] [--enforce-eager] [--only "ab -c 50"]

This service's settings can be changed through the environment (PHI_3_MINI_ENGINE_THREADS=2).

Writes benchmarks/results/real_model.json (real_model_eager.json with --enforce-eager).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("CITADEL_BENCH_MODEL", "models/smollm2-135m-instruct")

from ab_compare import run_ab  # noqa: E402
from loadgen import Load, run  # noqa: E402
from servers import (CAPACITY, Server, bench_model, engine_config, model_card, start_citadel,  # noqa: E402
                     start_vllm, wait_quiet, write_result)

CHATS = (
    "What is the capital of France?", "What is the chemical formula of water?",
    "Name three primary colours.", "Translate 'good morning' into Spanish.",
    "Write one sentence about the sea.", "What is 12 times 12?",
    "Who wrote Romeo and Juliet?", "Give me a synonym for 'quick'.",
    "What is the largest planet in the solar system?", "Explain in one sentence what a CPU does.",
)
COMPLETIONS = ("The capital of Germany is", "Once upon a time, in a small village,",
               "def fibonacci(n):", "The three states of matter are")


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: {exc.code} {exc.read()[:500]!r}") from None


def greedy_answers(server: Server) -> list[str]:
    """Every prompt's greedy answer (64 tokens at most), chats then completions."""
    answers = []
    for prompt in CHATS:
        out = _post(server.url + "/v1/chat/completions", {
            "model": "phi-3-mini", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": 64})
        answers.append(out["choices"][0]["message"]["content"])
    for prompt in COMPLETIONS:
        out = _post(server.url + "/v1/completions", {"model": "phi-3-mini", "prompt": prompt,
                                                     "temperature": 0, "max_tokens": 64})
        answers.append(out["choices"][0]["text"])
    return answers


def tokens_per_cpu_s(server: Server, load: Load) -> dict[str, Any]:
    """A closed-loop load, with the output tokens per CPU-second the whole tree spent on it."""
    before = server.tree_cpu_s()
    result = asyncio.run(run(load))
    cpu_s = server.tree_cpu_s() - before
    result["tree_cpu_s"] = cpu_s
    result["tokens_per_cpu_s"] = result["output_token_throughput"] * result["duration_s"] / cpu_s
    return result


def loads(rounds_requests: int) -> dict[str, tuple[Callable[[Server], dict[str, Any]], tuple[str, ...]]]:
    """Each load: what runs it against a server, and the figures it reports (key paths)."""
    payload = Path(tempfile.mkdtemp(prefix="citadel-real-")) / "payload.json"
    payload.write_text(json.dumps({"prompt": "Performance test", "max_tokens": 20}))
    n = rounds_requests
    return {
        "c=1, 20 tokens": (lambda s: asyncio.run(run(Load(url=s.url, requests=max(20, n // 25), concurrency=1,
                                                            max_tokens=20))),
                           ("e2e_ms.mean", "e2e_ms.p50", "e2e_ms.p99")),
        "ab -c 50, 20 tokens": (lambda s: run_ab(s.url, payload, n, 50), ("rps", "mean_ms", "p99_ms", "non2xx")),
        "ab -c 100, 20 tokens": (lambda s: run_ab(s.url, payload, n, 100), ("rps", "mean_ms", "p99_ms", "non2xx")),
        "stream c=16, 32+64 tokens": (
            lambda s: asyncio.run(run(Load(url=s.url, requests=max(48, n // 5), concurrency=16, prompt_tokens=32,
                                           max_tokens=64, stream=True))),
            ("ttft_ms.p50", "ttft_ms.p99", "itl_ms.p50", "itl_ms.p99", "output_token_throughput")),
        "tokens/CPU-s c=50, 20 tokens": (
            lambda s: tokens_per_cpu_s(s, Load(url=s.url, requests=n, concurrency=50, max_tokens=20)),
            ("tokens_per_cpu_s", "request_throughput", "failed")),
    }


def figure(result: dict[str, Any], path: str) -> float:
    value: Any = result
    for part in path.split("."):
        value = value[part]
    return float(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500, help="per closed-loop load at c=50/100")
    parser.add_argument("--enforce-eager", action="store_true", help="both systems without torch.compile")
    parser.add_argument("--only", default="", help="run only the loads whose name contains one of these (comma-separated), and no greedy check")
    parser.add_argument("--out", default="", help="file name under benchmarks/results")
    args = parser.parse_args()
    config = engine_config()
    work = Path(tempfile.mkdtemp(prefix="citadel-real-model-"))
    eager = {"enforce_eager": "true"} if args.enforce_eager else {}
    servers = {"citadel": start_citadel(config, **CAPACITY, **eager)}
    report: dict[str, Any] = {"model": str(bench_model()), "args": vars(args), "loads": {}}
    try:
        servers["citadel"].wait_ready(timeout_s=1200)
        # vLLM gets exactly the KV cache this service's engine made of memory_gb, in the dtype
        # it serves (ServiceProcess pins float32; PHI_3_MINI_DTYPE=bfloat16 changes it): the
        # trees' memory differs only by what each runs beside it
        card = model_card(servers["citadel"])
        kv, dtype = int(card["kv_cache_bytes"]), card["dtype"]
        report.update(kv_cache_bytes=kv, dtype=dtype)
        servers["vllm"] = start_vllm(config, work / "vllm.log", kv_cache_bytes=kv, dtype=dtype,
                                     extra=("--enforce-eager",) if args.enforce_eager else ())
        servers["vllm"].wait_ready(timeout_s=1200)
        report["ready_s"] = {name: s.ready_s for name, s in servers.items()}
        print(f"model {bench_model()} in {report['dtype']}; ready after {report['ready_s']['citadel']:.0f} s (citadel-llm), "
              f"{report['ready_s']['vllm']:.0f} s (vLLM server)", flush=True)
        if not args.only:
            answers = {name: greedy_answers(s) for name, s in servers.items()}
            same = sum(a == b for a, b in zip(answers["citadel"], answers["vllm"]))
            report["greedy"] = {"identical": same, "prompts": len(answers["citadel"]), "answers": answers}
            print(f"greedy answers identical: {same} of {len(answers['citadel'])}", flush=True)
        for server in servers.values():  # warm-up
            asyncio.run(run(Load(url=server.url, requests=100, concurrency=50, max_tokens=5)))
        for name, (measure, keys) in loads(args.requests).items():
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            runs: dict[str, list[dict[str, Any]]] = {"citadel": [], "vllm": []}
            for rnd in range(args.rounds):
                for system in (("citadel", "vllm") if rnd % 2 == 0 else ("vllm", "citadel")):
                    wait_quiet(list(servers.values()), timeout_s=30)
                    runs[system].append(measure(servers[system]))
            med = {system: {k: statistics.median(figure(r, k) for r in rs) for k in keys} for system, rs in runs.items()}
            report["loads"][name] = {"runs": runs, "median": med}
            print(f"{name:30s} " + "  ".join(
                f"{k} {med['citadel'][k]:.1f} vs {med['vllm'][k]:.1f}"
                + (f" ({med['citadel'][k] / med['vllm'][k]:.2f}x)" if med["vllm"][k] else "") for k in keys), flush=True)
        report["peak_rss_mb"] = {name: s.peak_rss_mb for name, s in servers.items()}
    finally:
        for server in servers.values():
            server.stop()
    rss = report["peak_rss_mb"]
    print(f"peak tree RSS: citadel-llm {rss['citadel']:.0f} MB, vLLM server {rss['vllm']:.0f} MB "
          f"({rss['citadel'] / rss['vllm']:.2f}x)")
    write_result(args.out or ("real_model_eager.json" if args.enforce_eager else "real_model.json"), report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
