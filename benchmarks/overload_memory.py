"""Does memory level off under repeated overload? Passes of 3 bursts of 500 concurrent
requests (a fifth of them cut off by their client at a random moment, a third streamed),
the RSS of every process of the service after each pass, printed as a table and written
to benchmarks/results/overload_memory.json.

    .venv/bin/python benchmarks/overload_memory.py [--passes 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import RESULTS_DIR  # noqa: E402
from tests.helpers import ServiceProcess  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    svc = ServiceProcess(log_level="WARNING").start()
    rng = random.Random(20261127)
    rows = []
    try:
        svc.wait_healthy()
        rows.append({"pass": 0, "rss_mb": rss_by_role(svc), "outcome": {}})
        print(f"pass  0  {rows[0]['rss_mb']}", flush=True)
        for n in range(1, args.passes + 1):
            started = time.monotonic()
            outcome: dict[str, int] = {}
            for _ in range(BURSTS_PER_PASS):
                for key, count in asyncio.run(burst(svc.base_url, rng)).items():
                    outcome[key] = outcome.get(key, 0) + count
            time.sleep(1.0)  # let the last aborts land
            rows.append({"pass": n, "seconds": round(time.monotonic() - started, 1), "rss_mb": rss_by_role(svc),
                         "outcome": outcome})
            print(f"pass {n:2d}  {rows[-1]['rss_mb']}  {outcome}", flush=True)
    finally:
        svc.stop()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "overload_memory.json").write_text(json.dumps(rows, indent=1))
    core = [r["rss_mb"].get("engine-core", 0.0) for r in rows]
    half = len(core) // 2
    print(f"EngineCore RSS: start {core[0]:.0f} MB, after pass 1 {core[1]:.0f}, pass {half} {core[half]:.0f}, "
          f"last {core[-1]:.0f}; growth over the second half {core[-1] - core[half]:+.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
