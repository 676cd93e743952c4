"""What response_format costs: the same chat request (64 tokens, greedy) without a constraint,
with the first json_schema request of the engine (vLLM builds its xgrammar backend and compiles
the grammar), with the same schema again (the compiled grammar is cached), with a new schema
each time (one compile each), and with json_object. Greedy on the demo model the grammar's
answer runs to max_tokens (whitespace), so every request generates the same number of tokens.

    .venv/bin/python benchmarks/structured_output.py [--url http://127.0.0.1:PORT] [--repeats 5]

Without --url it starts the service on the demo model (a fresh engine: the first-request cost
is only seen once per engine)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.local import ServiceProcess  # noqa: E402

MESSAGES = [{"role": "user", "content": "Is the sky blue? Answer in JSON."}]
MAX_TOKENS = 64


def schema(i: int) -> dict:
    return {"type": "object", "properties": {"answer": {"enum": [f"yes{i}", f"no{i}"]}, "sure": {"type": "boolean"}},
            "required": ["answer", "sure"], "additionalProperties": False}


def timed(url: str, extra: dict) -> float:
    body = {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        doc = json.loads(resp.read())
    elapsed = time.perf_counter() - started
    tokens = doc["usage"]["completion_tokens"]
    if tokens != MAX_TOKENS:
        raise RuntimeError(f"{tokens} tokens, not {MAX_TOKENS}: the comparison needs equal lengths ({extra})")
    return elapsed


def fmt(name: str, extra: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": extra}}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    svc = None
    url = args.url
    if url is None:
        svc = ServiceProcess(log_level="WARNING").start()
        svc.wait_healthy()
        url = svc.base_url
    try:
        timed(url, {"ignore_eos": True})  # warm the plain path
        plain = [timed(url, {"ignore_eos": True}) for _ in range(args.repeats)]
        first = timed(url, fmt("s0", schema(0)))
        same = [timed(url, fmt("s0", schema(0))) for _ in range(args.repeats)]
        new = [timed(url, fmt(f"s{i}", schema(i))) for i in range(1, args.repeats + 1)]
        json_object = [timed(url, {"response_format": {"type": "json_object"}}) for _ in range(args.repeats)]
    finally:
        if svc is not None:
            svc.stop()
    base = statistics.median(plain)
    print(f"{MAX_TOKENS} tokens, greedy, medians of {args.repeats} (seconds per request; ms per token beyond plain)")
    rows = [("no response_format", [base]), ("first json_schema on this engine", [first]),
            ("same schema again (cached grammar)", same), ("a new schema each time", new),
            ("json_object", json_object)]
    for name, values in rows:
        m = statistics.median(values)
        print(f"  {name:38s} {m:6.3f} s  {1000 * (m - base) / MAX_TOKENS:+6.2f} ms/token  {m / base:5.2f}x")


if __name__ == "__main__":
    main()
