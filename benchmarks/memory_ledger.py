"""Where every MiB of the service tree goes (issue 31): `benchmarks/memory_ledger.py`.

Starts this service on one model in a fresh memory cgroup of `--memory-gb` (as the deployed
slice sets `MemoryMax`), with `memory_gb` the same, and reads, from the kernel's own accounts:

- during the start, every 0.25 s: the tree's anonymous memory (RssAnon of every process) and
  the group's usage; the peak of each and when it came;
- at idle: per process, `/proc/PID/smaps_rollup` (anonymous, file-backed), and the engine's
  largest mappings from `/proc/PID/smaps`, grouped by what they map (the heap, anonymous
  regions, libtorch, safetensors files, ...);
- the group's `memory.stat` (anon, file, mapped file, kernel) and its peak and OOM kills;
- with `--burst N`: N streams at once, then the same again (the peak under load).

    .venv/bin/python benchmarks/memory_ledger.py --model /var/tmp/citadel-full-size/gptq \
        --memory-gb 4 --set kv_cache_dtype=fp8 --set enforce_eager=true --burst 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIB = 1 << 20


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def major_faults(server: Any) -> int:
    """Page faults of the tree that had to read from disk (/proc/PID/stat's majflt): a tree whose
    file-backed pages (mapped weights, libraries) the kernel evicts under the limit and reads back."""
    total = 0
    for proc in server._tree():
        try:
            total += int(Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[9])
        except (OSError, IndexError, ValueError):
            pass
    return total


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup in MiB: Rss, Anonymous, file-backed (Rss - Anonymous - Shmem)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    except OSError:
        return {}
    rss, anon, shmem = out.get("Rss", 0), out.get("Anonymous", 0), out.get("Shmem", 0)
    return {"rss": rss >> 10, "anon": anon >> 10, "file": (rss - anon - shmem) >> 10, "swap": out.get("Swap", 0) >> 10}


def _mapping_kind(name: str) -> str:
    if not name:
        return "[anonymous]"
    if name.startswith("["):
        return name
    base = name.rsplit("/", 1)[-1]
    if base.endswith(".safetensors"):
        return "*.safetensors"
    if ".so" in base:
        return base.split(".so")[0] + ".so"
    return base


def largest_mappings(pid: int, top: int = 12) -> list[tuple[str, int, int]]:
    """(what, Rss MiB, Anonymous MiB) of the process's mappings grouped by what they map."""
    rss: dict[str, int] = defaultdict(int)
    anon: dict[str, int] = defaultdict(int)
    kind = "[anonymous]"
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", head[0]):
            kind = _mapping_kind(head[5].strip() if len(head) > 5 else "")
        elif line.startswith("Rss:"):
            rss[kind] += int(line.split()[1])
        elif line.startswith("Anonymous:"):
            anon[kind] += int(line.split()[1])
    rows = sorted(rss, key=lambda k: -rss[k])[:top]
    return [(k, rss[k] >> 10, anon[k] >> 10) for k in rows]


def memory_stat(group: Any) -> dict[str, int]:
    """The group's memory.stat in MiB, under v2 names (v1's rss/cache/mapped_file mapped over)."""
    stat = {}
    for line in (group.path / "memory.stat").read_text().splitlines():
        key, value = line.split()
        stat[key] = int(value)
    if group.version == 1:
        return {"anon": stat.get("total_rss", stat.get("rss", 0)) >> 20,
                "file": stat.get("total_cache", stat.get("cache", 0)) >> 20,
                "file_mapped": stat.get("total_mapped_file", stat.get("mapped_file", 0)) >> 20,
                "shmem": stat.get("total_shmem", stat.get("shmem", 0)) >> 20}
    return {k: stat.get(k, 0) >> 20 for k in ("anon", "file", "file_mapped", "shmem", "kernel", "sock")}


def usage_bytes(group: Any) -> int:
    name = "memory.current" if group.version == 2 else "memory.usage_in_bytes"
    return int((group.path / name).read_text())


class Sampler:
    """The tree's anonymous memory and the group's usage, every 0.25 s, with their peaks."""

    def __init__(self, server: Any, group: Any) -> None:
        self.server, self.group = server, group
        self.started = time.monotonic()
        self.peak_anon_mb, self.peak_anon_at_s, self.peak_usage_mb = 0, 0.0, 0
        self.peak_by_role: dict[str, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from shared.process_tree import role_of

        while not self._done.wait(0.25):
            by_role: dict[str, int] = defaultdict(int)
            for proc in self.server._tree():
                by_role[role_of(proc)] += _status_kib(proc.pid, "RssAnon") >> 10
            anon = sum(by_role.values())
            if anon > self.peak_anon_mb:
                self.peak_anon_mb, self.peak_anon_at_s = anon, round(time.monotonic() - self.started, 1)
                self.peak_by_role = dict(by_role)
            try:
                self.peak_usage_mb = max(self.peak_usage_mb, usage_bytes(self.group) >> 20)
            except OSError:
                pass

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self._thread.join(timeout=5)
        return {"peak_anon_mb": self.peak_anon_mb, "peak_anon_at_s": self.peak_anon_at_s,
                "peak_anon_by_role": self.peak_by_role, "peak_usage_mb": self.peak_usage_mb}


def idle_ledger(server: Any, group: Any) -> dict[str, Any]:
    from shared.process_tree import role_of

    procs = {}
    engine_pid = 0
    for proc in server._tree():
        role = role_of(proc)
        procs[f"{role} ({proc.pid})"] = rollup(proc.pid)
        if role == "engine":
            engine_pid = proc.pid
    return {"processes": procs, "engine_mappings": largest_mappings(engine_pid) if engine_pid else [],
            "memory_stat": memory_stat(group), "usage_mb": usage_bytes(group) >> 20}


def burst(server: Any, n: int, prompt_tokens: int, max_tokens: int) -> dict[str, Any]:
    from loadgen import Load, run as run_load

    res = asyncio.run(run_load(Load(url=server.url, requests=n, concurrency=n, prompt_tokens=prompt_tokens,
                                    max_tokens=max_tokens, stream=True, timeout_s=1800, max_duration_s=1800)))
    return {"requests": n, "failed": res["failed"], "errors": res["errors_by_status"],
            "output_tok_s": round(res["output_token_throughput"], 2)}


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--memory-gb", type=float, default=4.0, help="memory_gb and the group's limit (GiB)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting (PHI_3_MINI_ name, lower case), e.g. kv_cache_dtype=fp8")
    parser.add_argument("--burst", type=int, default=0, help="streams at once after idle (0: none)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--start-timeout-s", type=float, default=900)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from servers import RESULTS_DIR, model_card, start_citadel
    from tests.cgroups import limited_memory, unavailable

    args = _args(argv)
    if why := unavailable():
        print(f"skipped: {why}")
        return 0
    settings = dict(s.split("=", 1) for s in args.set)
    from shared.config import Phi3MiniConfig

    report: dict[str, Any] = {"model": str(args.model), "memory_gb": args.memory_gb, "settings": settings}
    with limited_memory(int(args.memory_gb * (1 << 30))) as group:
        server = start_citadel(Phi3MiniConfig(), "citadel", preexec_fn=group.join, model_path=str(args.model),
                               memory_gb=str(args.memory_gb), efficiency_mode="false", log_level="INFO",
                               **settings)
        sampler = Sampler(server, group)
        try:
            try:
                server.wait_ready(timeout_s=args.start_timeout_s,
                                  give_up=lambda: "killed for memory while starting" if group.oom_kills() else "")
            except RuntimeError as err:
                report.update(ready=False, why=str(err), start=sampler.stop(), oom_kills=group.oom_kills())
                return _finish(report, args, RESULTS_DIR)
            report.update(ready=True, ready_s=round(server.ready_s, 1), start=sampler.stop())
            card = model_card(server)
            report["kv_cache_tokens"], report["kv_cache_mb"] = card.get("kv_cache_tokens"), (card.get("kv_cache_bytes") or 0) >> 20
            time.sleep(2)
            report["idle"] = idle_ledger(server, group)
            if args.burst:
                sampler = Sampler(server, group)
                faults = major_faults(server)
                report["bursts"] = [burst(server, args.burst, args.prompt_tokens, args.output_tokens) for _ in range(2)]
                report["load"] = {**sampler.stop(), "major_faults": major_faults(server) - faults}
            report.update(oom_kills=group.oom_kills(), group_peak_mb=group.peak_bytes() >> 20,
                          alive=server.proc.poll() is None)
        finally:
            server.stop()
    return _finish(report, args, RESULTS_DIR)


def _finish(report: dict[str, Any], args: argparse.Namespace, results_dir: Path) -> int:
    out = args.out or results_dir / f"memory_ledger-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"written: {out}")
    return 0 if report.get("ready") else 1


if __name__ == "__main__":
    sys.exit(main())
