"""A load generator for OpenAI-compatible completion servers, in the manner of `vllm bench serve`.

Closed loop at a fixed concurrency (like `ab -c`) or open loop with Poisson arrivals at a rate;
streaming or not; prompts of a given token length (as token ids, exact on any server). Reports
throughput, TTFT, TPOT, inter-token latency, end-to-end latency (mean, p50, p95, p99), errors
by status, goodput under SLOs, and its own CPU use (to show it is not the bottleneck).

    python benchmarks/loadgen.py --url http://127.0.0.1:11403 --concurrency 50 --requests 1000 --max-tokens 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass
class Load:
    url: str
    requests: int = 1000
    concurrency: int | None = 50  # closed loop; None for open loop
    rate: float | None = None  # open loop: mean requests/s (Poisson arrivals)
    prompt_tokens: int = 5
    max_tokens: int = 20
    stream: bool = False
    ignore_eos: bool = True
    model: str = "phi-3-mini"
    timeout_s: float = 120.0
    max_duration_s: float = 600.0  # stop sending after this long, whatever is left
    slo_e2e_ms: float = 500.0
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    seed: int = 0


@dataclass
class Sample:
    ok: bool
    status: int
    e2e_s: float
    ttft_s: float = 0.0
    output_tokens: int = 0
    itls_s: list[float] = field(default_factory=list)
    start_s: float = 0.0  # when it was sent, from the start of the run


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    ordered = sorted(values)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"mean": statistics.fmean(ordered), "p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99)}


def _prompt(load: Load, i: int) -> list[int]:
    rng = random.Random(load.seed * 1_000_003 + i)
    return [rng.randrange(10, 3000) for _ in range(load.prompt_tokens)]


async def _one(session: aiohttp.ClientSession, load: Load, i: int) -> Sample:
    body: dict[str, Any] = {"model": load.model, "prompt": _prompt(load, i), "max_tokens": load.max_tokens,
                            "temperature": 1.0, "stream": load.stream}
    if load.stream:
        body["stream_options"] = {"include_usage": True}
    if load.ignore_eos:
        body["ignore_eos"] = True
    started = time.perf_counter()
    try:
        async with session.post(load.url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                await resp.read()
                return Sample(False, resp.status, time.perf_counter() - started)
            if not load.stream:
                data = await resp.json()
                tokens = data.get("usage", {}).get("completion_tokens", 0)
                e2e = time.perf_counter() - started
                return Sample(True, 200, e2e, ttft_s=e2e, output_tokens=tokens)
            ttft = 0.0
            last = started
            itls: list[float] = []
            tokens = 0
            async for line in resp.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Sample(False, 599, now - started)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") for c in chunk.get("choices", [])):
                    continue
                if ttft == 0.0:
                    ttft = now - started
                else:
                    itls.append(now - last)
                last = now
            return Sample(True, 200, time.perf_counter() - started, ttft_s=ttft, output_tokens=tokens, itls_s=itls)
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return Sample(False, 0, time.perf_counter() - started)


async def run(load: Load) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=load.timeout_s)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    samples: list[Sample] = []
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + load.max_duration_s
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        if load.rate is None:
            counter = iter(range(load.requests))

            async def worker() -> None:
                for i in counter:
                    sent = time.perf_counter()
                    if sent > deadline:
                        return
                    sample = await _one(session, load, i)
                    sample.start_s = sent - started
                    samples.append(sample)

            await asyncio.gather(*(worker() for _ in range(load.concurrency or 1)))
        else:
            rng = random.Random(load.seed)
            tasks = []
            for i in range(load.requests):
                if time.perf_counter() > deadline:
                    break
                tasks.append(asyncio.create_task(_one(session, load, i)))
                await asyncio.sleep(rng.expovariate(load.rate))
            samples.extend(await asyncio.gather(*tasks))
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return summarize(load, samples, wall, cpu)


def summarize(load: Load, samples: list[Sample], wall_s: float, cpu_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    tpots = [(s.e2e_s - s.ttft_s) / (s.output_tokens - 1) for s in ok if s.output_tokens > 1 and s.ttft_s]

    def within_slo(s: Sample) -> bool:
        if s.e2e_s * 1000 > load.slo_e2e_ms:
            return False
        if load.slo_ttft_ms is not None and s.ttft_s * 1000 > load.slo_ttft_ms:
            return False
        if load.slo_tpot_ms is not None and s.output_tokens > 1:
            return (s.e2e_s - s.ttft_s) / (s.output_tokens - 1) * 1000 <= load.slo_tpot_ms
        return True

    ms = lambda d: {k: v * 1000 for k, v in d.items()}  # noqa: E731
    return {
        "load": asdict(load),
        "completed": len(ok), "failed": len(samples) - len(ok), "errors_by_status": errors,
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall_s,
        "output_token_throughput": sum(s.output_tokens for s in ok) / wall_s,
        "goodput": sum(1 for s in ok if within_slo(s)) / wall_s,
        "e2e_ms": ms(_percentiles([s.e2e_s for s in ok])),
        "ttft_ms": ms(_percentiles([s.ttft_s for s in ok if s.ttft_s])),
        "tpot_ms": ms(_percentiles(tpots)),
        "itl_ms": ms(_percentiles([x for s in ok for x in s.itls_s])),
        "loadgen_cpu_cores": cpu_s / wall_s,  # this process's own CPU use, in cores
        "slowest": [(round(s.start_s, 3), round(s.e2e_s * 1000, 1)) for s in sorted(ok, key=lambda s: -s.e2e_s)[:5]],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rate", type=float, default=None, help="open loop: Poisson arrivals per second")
    parser.add_argument("--prompt-tokens", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--no-ignore-eos", action="store_true")
    parser.add_argument("--slo-e2e-ms", type=float, default=500.0)
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    args = parser.parse_args()
    load = Load(url=args.url, requests=args.requests, concurrency=None if args.rate else args.concurrency,
                rate=args.rate, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, stream=args.stream,
                ignore_eos=not args.no_ignore_eos, slo_e2e_ms=args.slo_e2e_ms, slo_ttft_ms=args.slo_ttft_ms,
                slo_tpot_ms=args.slo_tpot_ms)
    print(json.dumps(asyncio.run(run(load)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
