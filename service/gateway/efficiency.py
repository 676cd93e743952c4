"""GET /efficiency (JSON) and GET /metrics/efficiency (Prometheus text): the engine's admission
state, asked live over the data socket, beside the orchestrator's last report (its
measurements, rates and decisions), read from the file it writes each interval."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web
from aioprometheus import Gauge, Registry
from aioprometheus.formats.text import TextFormatter

from shared.engine_client import EngineUnavailable
from service.gateway.keys import CLIENT, CONFIG, LOOP_LAG, METRICS
from shared import protocol as p
from shared.optimizations import optimization_settings

STATS_TIMEOUT_S = 1.0
_decode_report = msgspec.json.Decoder(p.EfficiencyReport).decode
_encode = msgspec.json.Encoder().encode


def _report(path: Any) -> p.EfficiencyReport | None:
    try:
        return _decode_report(path.read_bytes())
    except (OSError, msgspec.DecodeError):
        return None


async def efficiency_document(app: web.Application) -> dict[str, Any]:
    config = app[CONFIG]
    window_s = max(2.0, 2 * config.metrics_collection_interval)
    try:
        stats: p.EngineStats | None = await app[CLIENT].stats(STATS_TIMEOUT_S, window_s)
    except (EngineUnavailable, TimeoutError):
        stats = None
    report = _report(config.efficiency_report_path())
    now = time.time()
    doc: dict[str, Any] = {
        "efficiency_mode": config.efficiency_mode,
        "engine_connected": stats is not None,
        "optimizations": optimization_settings(config),  # the limits in force are under "limits"
    }
    gateway_refused = {labels["reason"]: int(value) for labels, value in app[METRICS].refused.get_all()}
    # how late each event loop ran over the last 10 s: one request holding a loop shows here
    doc["loop_lag_ms"] = {"gateway": _ms(app[LOOP_LAG].max_s()),
                          "engine": _ms(stats.loop_lag_max_s) if stats is not None else None}
    if stats is not None:
        doc["limits"] = {"max_num_seqs": stats.max_num_seqs, "max_num_batched_tokens": stats.max_num_batched_tokens,
                         "reason": stats.limits_reason}
        doc["ceilings"] = {"max_num_seqs": stats.max_num_seqs_ceiling,
                           "max_num_batched_tokens": stats.max_num_batched_tokens_ceiling}
        doc["admission"] = {
            "in_flight": stats.in_flight, "queued": stats.queued, "running": stats.running,
            "tokens_in_flight": stats.tokens_in_flight, "kv_cache_usage": round(stats.kv_cache_usage, 4),
            "estimated_wait_s": round(stats.estimated_wait_s, 3), "admitted_total": stats.admitted_total,
        }
        doc["latency"] = {
            "target_ms": config.target_latency_ms, "window_s": window_s, "requests": stats.window_requests,
            "e2e_p50_ms": _ms(stats.e2e_p50_s), "e2e_p95_ms": _ms(stats.e2e_p95_s),
            "engine_p95_ms": _ms(stats.service_p95_s), "engine_mean_ms": _ms(stats.mean_service_s),
            "ttft_p50_ms": _ms(stats.ttft_p50_s), "ttft_p95_ms": _ms(stats.ttft_p95_s),
            "within_target": stats.window_requests == 0 or stats.e2e_p95_s * 1000 <= config.target_latency_ms,
        }
        doc["refused"] = {"engine": stats.refused_total, "gateway": gateway_refused}
    else:
        doc["refused"] = {"gateway": gateway_refused}
    if report is not None:
        doc["orchestrator"] = {"report_age_s": round(now - report.at, 2), "interval_s": report.interval_s,
                               "connected_to_engine": report.connected, "engine_pid": report.engine_pid}
        doc["throughput"] = {
            "target_requests_per_s": config.target_throughput_rps,  # reported beside the measured rate
            "requests_per_s": report.requests_per_s, "tokens_per_s": report.tokens_per_s,
            "generated_tokens_per_s": report.generated_tokens_per_s,
            "tokens_per_cpu_second": report.tokens_per_cpu_second,
            "tokens_per_gb_second": report.tokens_per_gb_second,
        }
        limit = report.memory_limit_mb
        doc["measurements"] = {
            "cpu_seconds_per_s": report.cpu_seconds_per_s,
            "processes": [msgspec.structs.asdict(s) for s in report.processes],
            "memory": {"used_mb": report.memory_used_mb, "limit_mb": limit,
                       "fraction": round(report.memory_used_mb / limit, 4) if limit else None},
            "cgroup": msgspec.structs.asdict(report.cgroup) if report.cgroup else None,
            "system_memory": {"used_percent": report.system_memory_used_percent,
                              "available_mb": report.system_memory_available_mb},
        }
        doc["decisions"] = [msgspec.structs.asdict(d) for d in report.decisions]
    else:
        doc["orchestrator"] = None  # not running, or no sample yet
    return doc


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


async def efficiency(request: web.Request) -> web.Response:
    doc = await efficiency_document(request.app)
    return web.Response(body=_encode(doc), content_type="application/json")


async def efficiency_metrics(request: web.Request) -> web.Response:
    body, headers = exposition(await efficiency_document(request.app))
    return web.Response(body=body, headers={**headers, "X-Content-Type-Options": "nosniff"})


class _TextFormatter(TextFormatter):
    """aioprometheus's text format with label values escaped as the format requires (backslash,
    double quote, line feed); 23.12 writes them raw (claws/aioprometheus#91), so one odd value
    would cut the scrape. tests/service/test_efficiency_metrics.py fails if it ever escapes twice."""

    def _unify_labels(self, labels: dict[str, str], const_labels: dict[str, str],
                      ordered: bool = False) -> dict[str, str]:
        unified = super()._unify_labels(labels, const_labels, ordered)
        return {k: _escape(str(v)) for k, v in unified.items()} if unified else unified


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(doc: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The /efficiency document in the Prometheus text format, and its Content-Type header."""
    formatter = _TextFormatter()
    return formatter.marshall(efficiency_registry(doc)), formatter.get_headers()


def efficiency_registry(doc: dict[str, Any]) -> Registry:
    """A registry of gauges built from one /efficiency document (a snapshot: nothing carries over)."""
    registry = Registry()

    def gauge(name: str, help_: str, samples: list[tuple[dict[str, str], float | int | bool | None]]) -> None:
        g = Gauge(f"phi3_mini_efficiency_{name}", help_, registry=registry)
        for labels, value in samples:
            if value is not None:
                g.set(labels, float(value))

    gauge("mode", "1 when efficiency_mode steers the limits", [({}, doc["efficiency_mode"])])
    if "limits" in doc:
        gauge("limit", "Admission limits in force", [({"limit": k}, v) for k, v in doc["limits"].items() if k != "reason"])
        gauge("ceiling", "Ceilings the limits move within", [({"limit": k}, v) for k, v in doc["ceilings"].items()])
        gauge("admission", "Admission state", [({"state": k}, v) for k, v in doc["admission"].items()])
        lat = doc["latency"]
        gauge("latency_ms", "Recent latency percentiles, arrival in the worker to last token",
              [({"quantile": q, "kind": kind}, lat[f"{kind}_p{q[2:] if q != '0.5' else '50'}_ms"])
               for kind in ("e2e", "ttft") for q in ("0.5", "0.95")]
              + [({"quantile": "0.95", "kind": "engine"}, lat["engine_p95_ms"])])
        gauge("latency_target_ms", "The latency target", [({}, lat["target_ms"])])
        gauge("refused", "Requests refused by the engine's admission, by reason",
              [({"reason": k}, v) for k, v in doc["refused"]["engine"].items()])
    if doc.get("throughput"):
        gauge("throughput", "Rates over the last orchestrator interval",
              [({"rate": k}, v) for k, v in doc["throughput"].items()])
        m = doc["measurements"]
        gauge("process_rss_mb", "RSS by process", [({"role": s["role"], "pid": str(s["pid"])}, s["rss_mb"])
                                                   for s in m["processes"]])
        gauge("process_cpu_percent", "CPU by process over the last interval",
              [({"role": s["role"], "pid": str(s["pid"])}, s["cpu_percent"]) for s in m["processes"]])
        gauge("memory_mb", "Memory against the limit the policy keeps to",
              [({"kind": "used"}, m["memory"]["used_mb"]), ({"kind": "limit"}, m["memory"]["limit_mb"])])
        cg = m["cgroup"] or {}
        gauge("pressure", "PSI some avg10 (%)", [({"resource": "memory"}, cg.get("memory_pressure_some_avg10")),
                                                 ({"resource": "cpu"}, cg.get("cpu_pressure_some_avg10"))])
        gauge("decisions", "Decisions kept in the report", [({}, len(doc["decisions"]))])
    return registry
