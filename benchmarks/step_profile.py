"""Where one decode step at batch 1 goes (issues 31, 32): `benchmarks/step_profile.py`.

Builds the engine exactly as the service's engine worker does (service/engine/settings.py:
the same environment, plugin and engine arguments), in this process, with its EngineCore
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as the service runs it), generates `--tokens`
tokens for one prompt under torch's profiler and prints the time per decode step by operator
and by the layer kinds that call them (4-bit GEMMs, the LM head, attention, norms, ...). The
first `--warmup` requests run unprofiled.

    .venv/bin/python benchmarks/step_profile.py --model models/phi-3-mini-gptq-random \
        --set kv_cache_dtype=fp8 --set enforce_eager=true
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _config(model: str, sets: list[str]):  # -> Phi3MiniConfig
    """The shipped configuration with `model` and each FIELD=VALUE of `sets` over it."""
    from shared.config import ENV_PREFIX, load_config

    environ = {ENV_PREFIX + "MODEL_PATH": model}
    for item in sets:
        key, _, value = item.partition("=")
        environ[ENV_PREFIX + key.upper()] = value
    return load_config(environ=environ)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a Phi3MiniConfig field")
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    from service.engine import settings

    config = _config(args.model, args.set)
    cpu = settings.cpu_host()
    os.environ.update(settings.prepare_environment(config, cpu))
    import torch
    from vllm import LLM, SamplingParams

    engine_args = settings.engine_args(config, settings.resolve_model(config), cpu, core_on_thread=True)
    fields = {k: v for k, v in vars(engine_args).items() if k not in ("enable_log_requests",)}
    llm = LLM(**fields)
    params = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompt = "Tell me about efficiency."
    for _ in range(args.warmup):
        llm.generate([prompt], params, use_tqdm=False)
    started = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    plain_s = time.perf_counter() - started
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        profiled_s = time.perf_counter() - started
    steps = args.tokens  # one prefill step and tokens-1 decode steps
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1000 / steps
    total = sum(by_op.values())
    print(f"request of {args.tokens} tokens: {plain_s * 1000:.0f} ms unprofiled "
          f"({plain_s * 1000 / steps:.1f} ms a step), {profiled_s * 1000:.0f} ms profiled")
    print(f"self CPU time by operator, ms a step (all threads that torch saw: {total:.1f} ms):")
    for name, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"  {ms:8.2f}  {name[:100]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
