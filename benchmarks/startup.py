"""Start-up to healthy: `citadel-llm serve` from nothing to /health 200, for a model compiled
cold (an empty vLLM compile cache), compiled warm (the cache of the previous start) and eager
(`enforce_eager`: no torch.compile), one start at a time. The spec asks for a model load under
30 s; `load_seconds` is the engine's own figure (vLLM's AsyncLLM built), to healthy adds the
processes' start.

    CITADEL_BENCH_MODEL=models/smollm2-135m-instruct python benchmarks/startup.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

from servers import RESULTS_DIR, bench_model

from service.local import ServiceProcess


def start_once(env: dict[str, str], **settings: str) -> dict[str, float]:
    svc = ServiceProcess(model_path=str(bench_model()), **settings)
    svc.env.update(env)
    started = time.monotonic()
    svc.start()
    try:
        svc.wait_healthy(1800)
        healthy_s = time.monotonic() - started
    finally:
        svc.stop()
    ready = [json.loads(line) for line in svc.log_path.read_text(errors="replace").splitlines()
             if '"engine ready"' in line]
    return {"healthy_s": round(healthy_s, 1), "load_seconds": float(ready[0]["load_seconds"]) if ready else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="startup.json")
    args = parser.parse_args()
    report: dict[str, list[dict[str, float]]] = {"compiled, cold cache": [], "compiled, warm cache": [], "eager": []}
    for _ in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="citadel-vllm-cache-")  # VLLM_CACHE_ROOT: its compile cache
        report["compiled, cold cache"].append(start_once({"VLLM_CACHE_ROOT": cache}))
        report["compiled, warm cache"].append(start_once({"VLLM_CACHE_ROOT": cache}))
        report["eager"].append(start_once({"VLLM_CACHE_ROOT": cache}, enforce_eager="true"))
        for name, runs in report.items():
            print(f"{name:22s} to healthy {runs[-1]['healthy_s']:6.1f} s  (engine load {runs[-1]['load_seconds']:.1f} s)",
                  flush=True)
    print(f"\nmodel {bench_model()}, medians of {args.rounds}:")
    for name, runs in report.items():
        print(f"{name:22s} to healthy {statistics.median(r['healthy_s'] for r in runs):6.1f} s  engine load "
              f"{statistics.median(r['load_seconds'] for r in runs):6.1f} s")
    out = RESULTS_DIR / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(bench_model()), "runs": report}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
