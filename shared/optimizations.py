"""What the efficiency settings switch on, described from the configuration alone: shown on
/efficiency by the gateway and by `EfficiencyManager().get_optimization_status()`."""

from __future__ import annotations

from typing import Any

from shared.config import Phi3MiniConfig

# `engine_threads: 0` gives the forward pass every allotted core once it is what a step costs,
# and leaves one core to the front end (tokenizer, detokenizer, scheduler) for a model whose
# forward pass is almost free. Measured with benchmarks/engine_threads.py on 2 cores: the
# 3.4M-parameter demo model answered one request at a time 1.35x slower on 2 threads than on 1;
# SmolLM2-135M (30 layers) served ab -c 50 faster on 2 (BENCHMARKS.md). The line lies between.
FORWARD_BOUND_PARAMETERS = 50_000_000


def engine_thread_count(c: Phi3MiniConfig, parameters: int) -> int:
    """OpenMP threads of the engine's forward pass for a model of `parameters`: engine_threads
    if set (at most cpu_cores), else every core for a large model and cpu_cores - 1 for a small one."""
    if c.engine_threads:
        return min(c.engine_threads, c.cpu_cores)
    return c.cpu_cores if parameters >= FORWARD_BOUND_PARAMETERS else max(1, c.cpu_cores - 1)


def engine_core_on_a_thread(c: Phi3MiniConfig, parameters: int, cpu: bool) -> bool:
    """Whether vLLM's EngineCore runs on a thread of the engine worker (engine_core: thread)
    rather than in its own process: engine_core if set, else for a model whose forward pass
    dominates a step (the threads rule's line). GPU hosts keep vLLM's own process."""
    if not cpu:
        return False
    if c.engine_core != "auto":
        return c.engine_core == "thread"
    return parameters >= FORWARD_BOUND_PARAMETERS


def optimization_settings(c: Phi3MiniConfig) -> dict[str, Any]:
    """What the efficiency settings switch on, from the configuration alone."""
    return {
        "efficiency_mode": c.efficiency_mode,
        "steering": "adaptive admission limits (AIMD on the p95 time in the engine, and memory)" if c.efficiency_mode
                    else "off: the limits stay at the configured ceilings; the orchestrator only observes",
        "memory_optimization": {
            "enabled": c.memory_optimization,
            "effect": (f"KV cache sized to fit memory_gb={c.memory_gb:g} (vLLM's measurement where it is tight)"
                       if c.memory_optimization else "KV cache sized by vLLM's gpu_memory_utilization rule"),
        },
        "cpu_optimization": {
            "enabled": c.cpu_optimization,
            "effect": (_threads_effect(c) if c.cpu_optimization else "engine threads left to the OS scheduler"),
        },
        "engine_core": {
            "value": c.engine_core,
            "effect": _engine_core_effect(c),
        },
        "max_throughput_rps": {
            "value": c.max_throughput_rps,
            "effect": (f"latency steering keeps the sequences {c.max_throughput_rps:g} requests/s need"
                       if c.efficiency_mode else "none: efficiency_mode is off"),
        },
        "rate_limit_rps": {
            "value": c.rate_limit_rps,
            "effect": f"429 beyond {c.rate_limit_rps:g} requests/s" if c.rate_limit_rps else "off: no hard cap",
        },
        "target_latency_ms": c.target_latency_ms,
        "memory_gb": c.memory_gb,
    }


def _engine_core_effect(c: Phi3MiniConfig) -> str:
    thread, process = "on a thread of the engine worker", "in a process of its own (vLLM's layout)"
    if c.engine_core != "auto":
        return f"vLLM's EngineCore runs {thread if c.engine_core == 'thread' else process} on a CPU host"
    return (f"vLLM's EngineCore runs {thread} for a model of {FORWARD_BOUND_PARAMETERS // 1_000_000}M "
            f"parameters or more on a CPU host, else {process}")


def _threads_effect(c: Phi3MiniConfig) -> str:
    if c.engine_threads:
        return f"engine threads bound to {engine_thread_count(c, 0)} of the {c.cpu_cores} allotted cores"
    return (f"engine threads bound to all {c.cpu_cores} allotted cores for a model of "
            f"{FORWARD_BOUND_PARAMETERS // 1_000_000}M parameters or more, "
            f"to {engine_thread_count(c, 0)} for a smaller one")
