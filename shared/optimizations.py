"""What the efficiency settings switch on, described from the configuration alone: shown on
/efficiency by the gateway and by `EfficiencyManager().get_optimization_status()`."""

from __future__ import annotations

from typing import Any

from shared.config import Phi3MiniConfig


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
            "effect": (f"engine threads bound to {min(c.engine_threads, c.cpu_cores) or max(c.cpu_cores - 1, 1)} "
                       f"of the {c.cpu_cores} allotted cores"
                       if c.cpu_optimization else "engine threads left to the OS scheduler"),
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
