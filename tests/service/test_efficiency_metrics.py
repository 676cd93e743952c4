"""/metrics/efficiency from an /efficiency document: aioprometheus's text format, label values
escaped as the Prometheus text format requires, the metric names and labels of before."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.gateway.efficiency import exposition

ODD = 'say "hi"\\now\nand then'  # a double quote, a backslash and a line feed


def document(refused_reason: str = "too_slow", role: str = "engine") -> dict[str, Any]:
    """An /efficiency document with an engine and an orchestrator report, as efficiency_document builds."""
    return {
        "efficiency_mode": True,
        "engine_connected": True,
        "optimizations": {},
        "limits": {"max_num_seqs": 12, "max_num_batched_tokens": 512, "reason": "quiet"},
        "ceilings": {"max_num_seqs": 16, "max_num_batched_tokens": 512},
        "admission": {"in_flight": 2, "queued": 0, "running": 2, "tokens_in_flight": 40,
                      "kv_cache_usage": 0.125, "estimated_wait_s": 0.0, "admitted_total": 7},
        "latency": {"target_ms": 500.0, "window_s": 2.0, "requests": 7, "e2e_p50_ms": 120.0,
                    "e2e_p95_ms": 300.0, "engine_p95_ms": 250.0, "engine_mean_ms": 110.0,
                    "ttft_p50_ms": 20.0, "ttft_p95_ms": 45.5, "within_target": True},
        "refused": {"engine": {refused_reason: 3, "rate_limit": 0}, "gateway": {}},
        "orchestrator": {"report_age_s": 0.4, "interval_s": 0.5, "connected_to_engine": True, "engine_pid": 42},
        "throughput": {"target_requests_per_s": 100.0, "requests_per_s": 3.5, "tokens_per_s": 80.0,
                       "generated_tokens_per_s": 20.0, "tokens_per_cpu_second": 9.0, "tokens_per_gb_second": 11.0},
        "measurements": {
            "cpu_seconds_per_s": 1.2,
            "processes": [{"role": role, "pid": 42, "rss_mb": 900.5, "cpu_percent": 80.0},
                          {"role": "gateway", "pid": 41, "rss_mb": 60.0, "cpu_percent": 5.0}],
            "memory": {"used_mb": 1100.0, "limit_mb": 4096.0, "fraction": 0.2686},
            "cgroup": {"version": 2, "memory_pressure_some_avg10": 0.5, "cpu_pressure_some_avg10": None},
            "system_memory": {"used_percent": 40.0, "available_mb": 8000.0},
        },
        "decisions": [{"action": "increase"}],
    }


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, as Prometheus's own parser reads the text (it raises on a malformed line)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_label_values_are_escaped_per_the_text_format() -> None:
    body, headers = exposition(document(refused_reason=ODD, role=ODD))
    text = body.decode()
    assert 'phi3_mini_efficiency_refused{reason="say \\"hi\\"\\\\now\\nand then"} 3.0' in text.splitlines()
    parsed = samples(text)
    assert parsed[("phi3_mini_efficiency_refused", (("reason", ODD),))] == 3.0  # read back as written
    assert parsed[("phi3_mini_efficiency_process_rss_mb", (("pid", "42"), ("role", ODD)))] == 900.5
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")


def test_names_and_labels_are_those_of_before() -> None:
    body, _ = exposition(document())
    text = body.decode()
    assert 'phi3_mini_efficiency_ceiling{limit="max_num_seqs"} 16.0' in text.splitlines()
    assert "phi3_mini_efficiency_mode 1.0" in text.splitlines()
    parsed = samples(text)
    assert {name for name, _ in parsed} == {f"phi3_mini_efficiency_{n}" for n in (
        "mode", "limit", "ceiling", "admission", "latency_ms", "latency_target_ms", "refused", "throughput",
        "process_rss_mb", "process_cpu_percent", "memory_mb", "pressure", "decisions")}
    assert parsed[("phi3_mini_efficiency_limit", (("limit", "max_num_seqs"),))] == 12.0
    assert ("phi3_mini_efficiency_limit", (("limit", "reason"),)) not in parsed
    assert parsed[("phi3_mini_efficiency_latency_ms", (("kind", "ttft"), ("quantile", "0.95")))] == 45.5
    assert parsed[("phi3_mini_efficiency_latency_ms", (("kind", "engine"), ("quantile", "0.95")))] == 250.0
    assert parsed[("phi3_mini_efficiency_process_cpu_percent", (("pid", "41"), ("role", "gateway")))] == 5.0
    assert parsed[("phi3_mini_efficiency_pressure", (("resource", "memory"),))] == 0.5
    assert ("phi3_mini_efficiency_pressure", (("resource", "cpu"),)) not in parsed  # None: left out
    assert parsed[("phi3_mini_efficiency_decisions", ())] == 1.0


def test_without_engine_or_orchestrator_only_the_mode() -> None:
    body, _ = exposition({"efficiency_mode": False, "engine_connected": False, "refused": {"gateway": {}},
                          "orchestrator": None})
    assert samples(body.decode()) == {("phi3_mini_efficiency_mode", ()): 0.0}
