"""How long one request can hold the service's event loops: the engine worker's and the
gateway's lateness, idle, under the largest answer the caps allow, and under a /tokenize flood.

Measured from outside, the same way on any version of the service: a GetStats round trip on
the engine socket every 50 ms (it waits for the worker's loop) and a GET /v1/models every
50 ms (the gateway's); the worst and the p99 of each phase. Where the service exposes its own
gauges (phi3_mini_event_loop_lag_seconds), their values after each phase too. One service,
the demo model, eager; `--busy` keeps every core taken by CPU-bound processes meanwhile.

    .venv/bin/python benchmarks/loop_lag.py [--busy] [--out loop_lag.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from service.local import ServiceProcess, busy_cores, longest_tokens  # noqa: E402
from shared.engine_client import EngineClient  # noqa: E402

PROBE_EVERY_S = 0.05



async def _probe(svc: ServiceProcess, stop: asyncio.Event) -> dict[str, list[float]]:
    client = EngineClient(svc.runtime_dir / "engine.sock", role="bench")
    await client.connect()
    engine: list[float] = []
    gateway: list[float] = []
    async with aiohttp.ClientSession() as session:
        async def engine_probe() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                await client.stats(120)
                engine.append(time.perf_counter() - started)
                await asyncio.sleep(PROBE_EVERY_S)

        async def gateway_probe() -> None:
            while not stop.is_set():
                started = time.perf_counter()
                async with session.get(svc.base_url + "/v1/models") as resp:
                    await resp.read()
                gateway.append(time.perf_counter() - started)
                await asyncio.sleep(PROBE_EVERY_S)

        await asyncio.gather(engine_probe(), gateway_probe())
    await client.close()
    return {"engine": engine, "gateway": gateway}


async def _gauges(svc: ServiceProcess) -> dict[str, float]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{svc.metrics_port}/metrics") as resp:
            text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("phi3_mini_event_loop_lag_seconds{"):
            found[line.split('process="')[1].split('"')[0]] = round(float(line.split()[-1]) * 1000, 1)
    return found


async def _phase(svc: ServiceProcess, name: str, work: Any) -> dict[str, Any]:
    stop = asyncio.Event()
    probes = asyncio.ensure_future(_probe(svc, stop))
    started = time.monotonic()
    outcome = await work()
    took = time.monotonic() - started
    stop.set()
    times = await probes
    row: dict[str, Any] = {"phase": name, "seconds": round(took, 1), "outcome": outcome}
    for side, values in times.items():
        values = sorted(values)
        row[f"{side}_max_ms"] = round(values[-1] * 1000, 1) if values else None
        row[f"{side}_p99_ms"] = round(values[int(0.99 * (len(values) - 1))] * 1000, 1) if values else None
    row["gauges_ms"] = await _gauges(svc)
    print(json.dumps(row), flush=True)
    return row


async def _post(session: aiohttp.ClientSession, url: str, body: dict) -> int:
    async with session.post(url, json=body) as resp:
        await resp.read()
        return resp.status


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    svc = ServiceProcess(enforce_eager="true").start()
    rows = []
    try:
        svc.wait_healthy()
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            completions = svc.base_url + "/v1/completions"
            bias = {str(t): 100 for t in longest_tokens(2)}

            async def idle() -> str:
                await asyncio.sleep(5)
                return "idle"

            async def largest_answer() -> str:  # the caps' largest: 16 sequences of 2,040 tokens, 20 logprobs
                status = await _post(session, completions, {"prompt": "a", "max_tokens": 2040, "n": 16, "logprobs": 20,
                                                            "ignore_eos": True, "logit_bias": bias})
                return f"status {status}"

            async def large_answer_served() -> str:  # under the frame cap: built and sent by both processes
                status = await _post(session, completions, {"prompt": "a", "max_tokens": 1000, "n": 16, "logprobs": 20,
                                                            "ignore_eos": True})
                return f"status {status}"

            words = [f"w{random.Random(i).randrange(10**6)}" for i in range(5000)]
            text = " ".join(random.Random(1).choice(words) for _ in range(140_000))[:1_000_000]

            async def tokenize_flood() -> str:
                statuses = await asyncio.gather(*(_post(session, svc.base_url + "/tokenize", {"prompt": text})
                                                  for _ in range(30)))
                return f"statuses {sorted(set(statuses))}"

            for name, work in (("idle", idle), ("largest answer (400, over the frame cap)", largest_answer),
                               ("large answer (1,000 tokens, served)", large_answer_served),
                               ("tokenize flood (30 x 1 MB)", tokenize_flood)):
                rows.append(await _phase(svc, name, work))
    finally:
        svc.stop()
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", action="store_true", help="keep every core taken by CPU-bound processes")
    parser.add_argument("--out", default="loop_lag.json")
    args = parser.parse_args()
    with busy_cores(1800) if args.busy else contextlib.nullcontext():
        result = asyncio.run(main(args))
    out = ROOT / "benchmarks" / "results" / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("median engine max ms:", statistics.median(r["engine_max_ms"] for r in result if r["engine_max_ms"]))
