"""Does memory level off under repeated overload? Passes of 3 bursts of 500 concurrent
requests (a fifth of them cut off by their client at a random moment, a third streamed),
the RSS of every process of the service after each pass, printed as a table and written
to benchmarks/results/overload_memory.json.

    .venv/bin/python benchmarks/overload_memory.py [--passes 20] [--env NAME=VALUE ...]
        [--heap-probe 0,3,12] [--throughput-requests 600 [--throughput-rounds 3]] [--out NAME.json]

--env adds a variable to the service's environment (PHI_3_MINI_* settings, or ONEDNN_*,
GLIBC_TUNABLES, LD_PRELOAD ... which reach vLLM's EngineCore). --heap-probe puts
benchmarks/heap_probe on the service's PYTHONPATH (tracemalloc in the EngineCore) and dumps
a snapshot after the passes named; compare two with benchmarks/heap_probe/diff.py.
--throughput-requests times that many requests at concurrency 16 after the passes (prompts of
1 to 60 words, so the engine meets many batch sizes), with the RSS after them.
Each row also has the Rss of the EngineCore's glibc [heap] mapping.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import RESULTS_DIR  # noqa: E402
from service.local import ServiceProcess  # noqa: E402

HEAP_PROBE_DIR = Path(__file__).resolve().parent / "heap_probe"

BURST = 500
BURSTS_PER_PASS = 3


async def one(session: aiohttp.ClientSession, url: str, rng: random.Random) -> str:
    body = {"prompt": f"load {rng.random()}", "max_tokens": rng.randint(8, 64), "ignore_eos": True,
            "stream": rng.random() < 1 / 3}
    async with session.post(url + "/v1/completions", json=body) as resp:
        await resp.read()
        return str(resp.status)


async def burst(url: str, rng: random.Random) -> dict[str, int]:
    outcome: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.ensure_future(one(session, url, rng)) for _ in range(BURST)]
        cut = [t for t in tasks if rng.random() < 0.2]
        await asyncio.sleep(rng.uniform(0.05, 0.5))
        for task in cut:
            task.cancel()  # the client goes away: its connection closes mid-request
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            key = "cut" if isinstance(result, asyncio.CancelledError) else (
                result if isinstance(result, str) else type(result).__name__)
            outcome[key] = outcome.get(key, 0) + 1
    return outcome


async def throughput(url: str, requests: int, concurrency: int = 16) -> dict[str, object]:
    """Closed loop, no refusals expected: prompts of 1 to 60 words and 8 to 64 tokens each, so that
    the engine meets many batch shapes; the same sequence of requests in every run."""
    rng = random.Random(7)
    bodies = [{"prompt": " ".join(f"w{rng.randint(0, 999)}" for _ in range(rng.randint(1, 60))),
               "max_tokens": rng.randint(8, 64), "ignore_eos": True} for _ in range(requests)]
    queue = list(reversed(bodies))
    status: dict[str, int] = {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def worker() -> None:
            while queue:
                body = queue.pop()
                async with session.post(url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    status[str(resp.status)] = status.get(str(resp.status), 0) + 1
        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.monotonic() - started
    ok = status.get("200", 0)
    tokens = sum(b["max_tokens"] for b in bodies)
    return {"requests": requests, "status": status, "seconds": round(seconds, 2),
            "requests_per_s": round(requests / seconds, 2), "output_tokens_per_s": round(tokens / seconds, 1),
            "ok": ok}


def rss_by_role(svc: ServiceProcess) -> dict[str, float]:
    roles: dict[str, float] = {}
    for role, proc in svc.children().items():
        try:
            roles[role] = proc.memory_info().rss / 2**20
            for child in proc.children(recursive=True):  # vLLM's EngineCore under the engine worker
                roles[f"{role}-core"] = roles.get(f"{role}-core", 0.0) + child.memory_info().rss / 2**20
        except psutil.Error:
            pass
    return {k: round(v, 1) for k, v in sorted(roles.items())}


def engine_core(svc: ServiceProcess) -> psutil.Process | None:
    engine = svc.children().get("engine")
    kids = engine.children() if engine else []  # the EngineCore and multiprocessing's resource tracker
    kids = [k for k in kids if "resource_tracker" not in " ".join(k.cmdline())]
    return max(kids, key=lambda k: k.memory_info().rss) if kids else None


def heap_rss_mb(pid: int) -> float | None:
    """Rss of glibc's main-arena [heap] mapping of the process."""
    try:
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            if not line[0].isupper() or ":" not in line.split()[0]:
                inside = line.rstrip().endswith("[heap]")
            elif inside and line.startswith("Rss:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def probe_dump(folder: Path, pid: int, tag: str, timeout_s: float = 120.0) -> None:
    (folder / f"request-{pid}-{tag}").touch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (folder / f"done-{pid}-{tag}").exists():
        time.sleep(0.2)
    print(f"heap probe {tag}: {'written' if (folder / f'done-{pid}-{tag}').exists() else 'TIMED OUT'} "
          f"-> {folder}/{pid}-{tag}.snap", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--heap-probe", default="", metavar="PASSES", help="e.g. 3,12")
    parser.add_argument("--out", default="overload_memory.json")
    parser.add_argument("--throughput-requests", type=int, default=0,
                        help="after the passes, time this many requests at concurrency 16 (max 2000)")
    parser.add_argument("--throughput-rounds", type=int, default=1, help="times to repeat that (max 10)")
    args = parser.parse_args()
    args.passes = max(1, min(args.passes, 200))
    svc = ServiceProcess(log_level="WARNING")
    extra = dict(item.split("=", 1) for item in args.env)
    svc.env.update(extra)
    probe_at = {int(x) for x in args.heap_probe.split(",") if x}
    probe_dir = svc.runtime_dir / "heap_probe"
    if probe_at:
        probe_dir.mkdir()
        svc.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HEAP_PROBE_DIR), svc.env.get("PYTHONPATH")]))
        svc.env["HEAP_PROBE_DIR"] = str(probe_dir)
    svc.start()
    rng = random.Random(20261127)
    rows = []
    print(f"service env extra: {extra}  heap probe after passes: {sorted(probe_at)}", flush=True)
    try:
        svc.wait_healthy()
        core = engine_core(svc)
        core_pid = core.pid if core else 0
        rows.append({"pass": 0, "rss_mb": rss_by_role(svc), "heap_mb": heap_rss_mb(core_pid), "outcome": {}})
        print(f"pass  0  {rows[0]['rss_mb']}  [heap] {rows[0]['heap_mb']}", flush=True)
        if probe_at:
            probe_dump(probe_dir, core_pid, "start")
        if 0 in probe_at:
            probe_dump(probe_dir, core_pid, "0")
        for n in range(1, args.passes + 1):
            started = time.monotonic()
            outcome: dict[str, int] = {}
            for _ in range(BURSTS_PER_PASS):
                for key, count in asyncio.run(burst(svc.base_url, rng)).items():
                    outcome[key] = outcome.get(key, 0) + count
            time.sleep(1.0)  # let the last aborts land
            rows.append({"pass": n, "seconds": round(time.monotonic() - started, 1), "rss_mb": rss_by_role(svc),
                         "heap_mb": heap_rss_mb(core_pid), "outcome": outcome})
            print(f"pass {n:2d}  {rows[-1]['rss_mb']}  [heap] {rows[-1]['heap_mb']}  {outcome}  "
                  f"{rows[-1]['seconds']} s", flush=True)
            if n in probe_at:
                probe_dump(probe_dir, core_pid, str(n))
        for _ in range(min(args.throughput_rounds, 10) if args.throughput_requests else 0):
            tput = asyncio.run(throughput(svc.base_url, min(args.throughput_requests, 2000)))
            rows.append({"pass": "throughput", **tput, "rss_mb": rss_by_role(svc), "heap_mb": heap_rss_mb(core_pid)})
            print(f"throughput: {tput}  {rows[-1]['rss_mb']}  [heap] {rows[-1]['heap_mb']}", flush=True)
    finally:
        svc.stop()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / args.out).write_text(json.dumps({"env": extra, "rows": rows}, indent=1)
                                        if extra or probe_at else json.dumps(rows, indent=1))
    core = [r["rss_mb"].get("engine-core", 0.0) for r in rows if r["pass"] != "throughput"]
    half = len(core) // 2
    print(f"EngineCore RSS: start {core[0]:.0f} MB, after pass 1 {core[1]:.0f}, pass {half} {core[half]:.0f}, "
          f"last {core[-1]:.0f}; growth over the second half {core[-1] - core[half]:+.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
