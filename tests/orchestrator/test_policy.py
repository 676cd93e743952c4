"""The efficiency policy on synthetic measurement sequences."""

from __future__ import annotations

from dataclasses import replace

import msgspec

from orchestrator.policy import EfficiencyManager, Observation
from shared.config import Phi3MiniConfig

CONFIG = Phi3MiniConfig(target_latency_ms=500, max_num_seqs=32, max_num_batched_tokens=1024)


def obs(seqs: int = 32, **kw: float) -> Observation:
    base = Observation(max_num_seqs=seqs, max_num_batched_tokens=1024, max_num_seqs_ceiling=32,
                       max_num_batched_tokens_ceiling=1024, in_flight=40, queued=8, window_requests=50,
                       service_p95_s=0.3, memory_used_mb=1500, memory_limit_mb=4096)
    return replace(base, **kw)


def test_a_latency_breach_lowers_the_limits() -> None:
    manager = EfficiencyManager(CONFIG)
    d = manager.decide(obs(service_p95_s=0.9))
    assert d.action == "decrease" and d.max_num_seqs == 22 and "p95 time in the engine" in d.reason
    assert d.max_num_batched_tokens < 1024
    assert manager.decisions[-1] is d and d.inputs["service_p95_ms"] == 900


def test_waiting_alone_does_not_lower_the_limits() -> None:
    """A long queue with a quick engine: fewer sequences would only lengthen the queue."""
    d = EfficiencyManager(CONFIG).decide(obs(seqs=16, service_p95_s=0.3, e2e_p95_s=2.0, queued=60))
    assert d.action == "hold" and d.max_num_seqs == 16


def test_headroom_with_waiting_requests_raises_the_limits() -> None:
    d = EfficiencyManager(CONFIG).decide(obs(seqs=8, service_p95_s=0.1, queued=5))
    assert d.action == "increase" and d.max_num_seqs == 10 and d.max_num_batched_tokens >= 256


def test_memory_near_the_limit_or_pressure_lowers_the_limits() -> None:
    assert EfficiencyManager(CONFIG).decide(obs(memory_used_mb=3800)).action == "decrease"
    d = EfficiencyManager(CONFIG).decide(obs(memory_pressure=25.0))
    assert d.action == "decrease" and "pressure" in d.reason


def test_never_below_one_nor_above_the_ceiling() -> None:
    manager = EfficiencyManager(CONFIG)
    assert manager.decide(obs(seqs=1, service_p95_s=5.0)).max_num_seqs == 1
    d = EfficiencyManager(CONFIG).decide(obs(seqs=32, service_p95_s=0.05, queued=100))
    assert d.max_num_seqs == 32 and d.action == "hold"


def test_a_quiet_period_restores_the_limits() -> None:
    manager = EfficiencyManager(CONFIG)
    seqs = 4
    for _ in range(20):
        d = manager.decide(obs(seqs=seqs, in_flight=0, queued=0, window_requests=0, service_p95_s=0.0))
        seqs = d.max_num_seqs
    assert seqs == 32


def test_steady_load_settles_without_oscillating() -> None:
    """A load whose p95 time in the engine grows with the batch (25 ms per sequence): the limit
    settles in the band (50 % to 80 % of the target)."""
    manager = EfficiencyManager(CONFIG)
    seqs, history = 32, []
    for _ in range(60):
        d = manager.decide(obs(seqs=seqs, service_p95_s=0.025 * seqs, queued=20))
        seqs = d.max_num_seqs
        history.append(seqs)
    tail = history[-30:]
    assert len(set(tail)) == 1, history  # no change at all over the last 30 samples
    assert 0.5 * 0.5 <= 0.025 * tail[0] <= 0.8 * 0.5  # inside the band: 10..16 sequences


def test_no_second_decrease_before_the_first_shows() -> None:
    manager = EfficiencyManager(CONFIG)
    first = manager.decide(obs(seqs=32, service_p95_s=0.9))
    second = manager.decide(obs(seqs=first.max_num_seqs, service_p95_s=0.9))
    assert (first.action, second.action) == ("decrease", "hold")


def test_observing_only_when_efficiency_mode_is_off() -> None:
    manager = EfficiencyManager(Phi3MiniConfig(efficiency_mode=False))
    for sample in (obs(service_p95_s=5.0), obs(memory_used_mb=4000), obs(seqs=4, queued=50, service_p95_s=0.01)):
        d = manager.decide(sample)
        assert d.action == "hold" and d.max_num_seqs == sample.max_num_seqs
    assert not manager.decisions


def test_get_optimization_status_is_the_specs_validation_command() -> None:
    status = EfficiencyManager().get_optimization_status()
    assert status["efficiency_mode"] is True
    assert status["memory_optimization"]["enabled"] and "KV cache" in status["memory_optimization"]["effect"]
    assert status["cpu_optimization"]["enabled"] and "cores" in status["cpu_optimization"]["effect"]
    assert status["limits"] == {"max_num_seqs": 32, "max_num_batched_tokens": 1024}


def test_refusals_are_demand_not_quiet() -> None:
    manager = EfficiencyManager(CONFIG)
    d = manager.decide(obs(seqs=8, in_flight=0, queued=0, refused=40, window_requests=50, service_p95_s=0.35))
    assert d.action == "hold" and "quiet" not in d.reason  # busy shedding, and no headroom: hold
    d = manager.decide(obs(seqs=8, in_flight=0, queued=0, refused=40, window_requests=50, service_p95_s=0.1))
    assert d.action == "increase" and "40 refused" in d.reason


def test_a_latency_decrease_keeps_what_max_throughput_rps_needs() -> None:
    """100 requests/s at 0.15 s each in vLLM need 15 sequences (Little's law): the latency
    steering trims down to them and no further."""
    manager = EfficiencyManager(msgspec.structs.replace(CONFIG, max_throughput_rps=100))
    d = manager.decide(obs(seqs=20, service_p95_s=0.9, mean_service_s=0.15))
    assert d.action == "decrease" and d.max_num_seqs == 15  # not 14 (20 x 0.7)
    d = EfficiencyManager(msgspec.structs.replace(CONFIG, max_throughput_rps=100)).decide(
        obs(seqs=15, service_p95_s=0.9, mean_service_s=0.15))
    assert d.action == "hold" and d.max_num_seqs == 15 and "max_throughput_rps=100 needs" in d.reason
    # a lower rate leaves room to trim
    d = EfficiencyManager(msgspec.structs.replace(CONFIG, max_throughput_rps=10)).decide(
        obs(seqs=15, service_p95_s=0.9, mean_service_s=0.15))
    assert d.action == "decrease" and d.max_num_seqs == 10


def test_memory_is_not_floored_by_max_throughput_rps() -> None:
    d = EfficiencyManager(CONFIG).decide(obs(seqs=20, memory_used_mb=3900, mean_service_s=0.3))
    assert d.action == "decrease" and d.max_num_seqs == 14


def test_status_says_max_throughput_rps_is_not_a_cap() -> None:
    status = EfficiencyManager(CONFIG).get_optimization_status()
    assert "keeps the sequences" in status["max_throughput_rps"]["effect"]
    assert status["rate_limit_rps"] == {"value": 0.0, "effect": "off: no hard cap"}


def test_memory_the_limits_cannot_free_does_not_cripple_the_batch() -> None:
    """A model whose idle footprint (weights, preallocated KV cache, runtime) is over the limit:
    at idle the limits stay at (or go back to) the ceilings, and under load only memory that
    came with the load is a reason to shrink."""
    manager = EfficiencyManager(CONFIG)
    over = 4300.0  # 105 % of 4096 MB, with nothing running
    d = manager.decide(obs(seqs=8, in_flight=0, queued=0, memory_used_mb=over))
    assert d.action == "increase" and d.max_num_seqs > 8  # restored, not driven to the floor
    d = manager.decide(obs(seqs=32, in_flight=0, queued=0, memory_used_mb=over))
    assert d.action == "hold" and "while idle" in d.reason and "below this model's footprint" in d.reason
    d = manager.decide(obs(seqs=32, memory_used_mb=over + 50))  # load: +50 MB, under 5 % of the limit
    assert d.action == "hold" and "50 MB of it comes with the load" in d.reason
    d = manager.decide(obs(seqs=32, memory_used_mb=over + 300))  # load: +300 MB, worth freeing
    assert d.action == "decrease" and d.max_num_seqs == 22 and "memory at" in d.reason


def test_a_latency_breach_still_decreases_over_a_static_memory_footprint() -> None:
    manager = EfficiencyManager(CONFIG)
    manager.decide(obs(in_flight=0, queued=0, memory_used_mb=3900))
    d = manager.decide(obs(memory_used_mb=3910, service_p95_s=0.9))
    assert d.action == "decrease" and "p95 time in the engine" in d.reason


def test_a_latency_decrease_over_a_static_footprint_keeps_the_throughput_floor() -> None:
    manager = EfficiencyManager(CONFIG)
    manager.decide(obs(in_flight=0, queued=0, memory_used_mb=3900))
    d = manager.decide(obs(seqs=20, memory_used_mb=3910, service_p95_s=0.9, mean_service_s=0.3))
    assert d.action == "hold" and "max_throughput_rps" in d.reason  # 100 req/s × 0.3 s needs 30 > 20
