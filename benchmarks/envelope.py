"""Phi-3-mini in its own envelope, this service against llama.cpp's server (issue 31): `make bench-envelope`.

Both on the same random weights with Phi-3-mini-4k-instruct's exact shapes: this service on the
4-bit GPTQ checkpoint (`demo-model --size full --quantization gptq`, prepared weights from an
earlier start), llama-server on a Q4_K_M GGUF of the same shapes (benchmarks/llama_cpp.py).
One system at a time, each in a fresh memory cgroup of `--memory-gb` (4: the deployed slice's
`MemoryMax=4G`), 2 threads, the page cache of its weights dropped before it starts (so what it
reads is charged to its own group). For each:

- time to ready; KV cache tokens (this service: its model card; llama-server: `-c`);
- the group's memory at idle and its peak, and the tree's major page faults under load (pages
  the kernel evicted under the limit and read back from disk);
- one stream (`--prompt-tokens` in, `--output-tokens` out): TTFT and ITL;
- output tokens/s at 4 and 16 concurrent streams;
- the spec's request (20 tokens) at c=1 and c=16: requests/s and mean latency.

    .venv/bin/python benchmarks/envelope.py [--systems citadel,llama] [--llama-ctx 8192]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = Path("/var/tmp/citadel-full-size")

from service.local import drop_page_cache  # noqa: E402


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default="citadel,llama")
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--models-dir", type=Path, default=MODELS)
    parser.add_argument("--llama-ctx", type=int, default=8192, help="llama-server's -c (its KV cache, tokens)")
    parser.add_argument("--llama-slots", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--streams", default="1,4,16")
    parser.add_argument("--spec-concurrency", default="1,16")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _measure(server: Any, group: Any, args: argparse.Namespace, row: dict[str, Any]) -> None:
    from loadgen import Load, run as run_load
    from memory_ledger import Sampler, major_faults, usage_bytes

    row["idle_group_mb"] = usage_bytes(group) >> 20
    sampler = Sampler(server, group)
    faults = major_faults(server)
    for n in (int(x) for x in args.streams.split(",")):
        res = asyncio.run(run_load(Load(url=server.url, requests=n, concurrency=n, prompt_tokens=args.prompt_tokens,
                                        max_tokens=args.output_tokens, stream=True, timeout_s=1800,
                                        max_duration_s=1800)))
        row[f"streams_{n}"] = {"output_tok_s": round(res["output_token_throughput"], 2), "failed": res["failed"],
                               "ttft_ms_p50": _ms(res["ttft_ms"]["p50"]), "itl_ms_p50": _ms(res["itl_ms"]["p50"])}
    for c in (int(x) for x in args.spec_concurrency.split(",")):
        res = asyncio.run(run_load(Load(url=server.url, requests=max(2 * c, 4), concurrency=c, prompt_tokens=5,
                                        max_tokens=20, stream=False, timeout_s=1800, max_duration_s=1800)))
        row[f"spec_c{c}"] = {"rps": round(res["request_throughput"], 3), "mean_ms": _ms(res["e2e_ms"]["mean"]),
                             "failed": res["failed"]}
    load = sampler.stop()
    row.update(peak_anon_mb=load["peak_anon_mb"], group_peak_mb=group.peak_bytes() >> 20,
               major_faults=major_faults(server) - faults, oom_kills=group.oom_kills(),
               alive=server.proc.poll() is None)


def _ms(value: float) -> int | None:
    return None if value != value else round(value)


def run_citadel(args: argparse.Namespace) -> dict[str, Any]:
    from servers import model_card, start_citadel
    from shared.config import Phi3MiniConfig
    from tests.cgroups import limited_memory

    from service.engine.settings import prepared_weights_dir
    from service.full_size_model import make_full_model

    model = make_full_model(args.models_dir / "gptq", quantization="gptq")
    row: dict[str, Any] = {"system": "citadel-llm", "weights": "GPTQ 4-bit g128 (2.28 GB)"}
    if not any(prepared_weights_dir().glob("*/manifest.json")):
        row["first_start"] = _start_only(args, model)  # the start that repacks and prepares
    drop_page_cache(prepared_weights_dir())
    with limited_memory(int(args.memory_gb * (1 << 30))) as group:
        server = start_citadel(Phi3MiniConfig(), "citadel", preexec_fn=group.join, model_path=str(model),
                               memory_gb=str(args.memory_gb), cpu_cores="2", max_model_len="2048",
                               kv_cache_dtype="fp8", dtype="auto", enforce_eager="true", max_num_seqs="32",
                               max_num_batched_tokens="1024", efficiency_mode="false", request_timeout_s="1800")
        try:
            server.wait_ready(timeout_s=1800, give_up=lambda: "killed for memory" if group.oom_kills() else "")
            row.update(ready_s=round(server.ready_s, 1), kv_tokens=model_card(server)["kv_cache_tokens"])
            _measure(server, group, args, row)
        finally:
            server.stop()
    return row


def _start_only(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    from servers import model_card, start_citadel
    from shared.config import Phi3MiniConfig
    from tests.cgroups import limited_memory

    drop_page_cache(model)
    with limited_memory(int(args.memory_gb * (1 << 30))) as group:
        server = start_citadel(Phi3MiniConfig(), "citadel", preexec_fn=group.join, model_path=str(model),
                               memory_gb=str(args.memory_gb), kv_cache_dtype="fp8", dtype="auto", enforce_eager="true")
        try:
            server.wait_ready(timeout_s=1800, give_up=lambda: "killed for memory" if group.oom_kills() else "")
            return {"ready_s": round(server.ready_s, 1), "kv_tokens": model_card(server)["kv_cache_tokens"],
                    "group_peak_mb": group.peak_bytes() >> 20, "oom_kills": group.oom_kills()}
        finally:
            server.stop()


def run_llama(args: argparse.Namespace) -> dict[str, Any]:
    import llama_cpp
    import urllib.request

    from service.local import free_port
    from tests.cgroups import limited_memory

    bin_dir = llama_cpp.build()
    f16 = llama_cpp.phi3_gguf(args.models_dir / "gptq", args.models_dir / "phi3-mini-f16.gguf")
    gguf = llama_cpp.quantize(bin_dir, f16, args.models_dir / "phi3-mini-Q4_K_M.gguf")
    drop_page_cache(gguf)
    row: dict[str, Any] = {"system": "llama-server", "weights": f"Q4_K_M ({gguf.stat().st_size / 1e9:.2f} GB)",
                           "kv_tokens": args.llama_ctx,
                           "settings": " ".join(llama_cpp.server_args(gguf, args.llama_ctx, args.llama_slots, 2)[2:])}
    log = Path(tempfile.mkdtemp(prefix="citadel-llama-")) / "llama-server.log"
    with limited_memory(int(args.memory_gb * (1 << 30))) as group:
        started = time.monotonic()
        server = llama_cpp.start(bin_dir, gguf, free_port(), log, args.llama_ctx, args.llama_slots, 2,
                                 preexec_fn=group.join)
        try:
            while True:
                if server.proc.poll() is not None or time.monotonic() - started > 600:
                    row.update(ready=False, oom_kills=group.oom_kills())
                    return row
                try:
                    urllib.request.urlopen(server.url + "/health", timeout=2)
                    break
                except OSError:
                    time.sleep(0.1)
            row["ready_s"] = round(time.monotonic() - started, 1)
            _measure(server, group, args, row)
        finally:
            server.stop()
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def cell(row: dict[str, Any], pick: Any) -> str:
        try:
            return str(pick(row))
        except (KeyError, TypeError):
            return "–"

    lines = [("ready (s)", lambda r: r["ready_s"]), ("KV cache (tokens)", lambda r: r["kv_tokens"]),
             ("idle / peak group memory (MiB)", lambda r: f"{r['idle_group_mb']} / {r['group_peak_mb']}"),
             ("major page faults under load", lambda r: r["major_faults"]),
             ("1 stream: TTFT / ITL p50 (ms)", lambda r: f"{r['streams_1']['ttft_ms_p50']} / {r['streams_1']['itl_ms_p50']}"),
             ("4 streams: output tok/s (failed)", lambda r: f"{r['streams_4']['output_tok_s']} ({r['streams_4']['failed']})"),
             ("16 streams: output tok/s (failed)", lambda r: f"{r['streams_16']['output_tok_s']} ({r['streams_16']['failed']})"),
             ("spec request c=1: req/s, mean ms", lambda r: f"{r['spec_c1']['rps']}, {r['spec_c1']['mean_ms']}"),
             ("spec request c=16: req/s, mean ms", lambda r: f"{r['spec_c16']['rps']}, {r['spec_c16']['mean_ms']}"),
             ("OOM kills", lambda r: r["oom_kills"])]
    out = ["| measure | " + " | ".join(f"{r['system']}, {r['weights']}" for r in rows) + " |",
           "| --- |" + " --- |" * len(rows)]
    out += [f"| {label} | " + " | ".join(cell(r, pick) for r in rows) + " |" for label, pick in lines]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from tests.cgroups import unavailable

    args = _args(argv)
    if why := unavailable():
        print(f"skipped: {why}")
        return 0
    runners = {"citadel": run_citadel, "llama": run_llama}
    rows = []
    for name in args.systems.split(","):
        row = runners[name](args)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))
    out = args.out or ROOT / "benchmarks" / "results" / f"envelope-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"memory_gb": args.memory_gb, "rows": rows}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
